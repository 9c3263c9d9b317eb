//! The `cutoff` binary: parses the command line and hands over to the library.
//!
//! The allocator is jemalloc (the default `jemalloc` feature). glibc's malloc serves the
//! allocations of a proxy badly: each new client connection allocates hyper's 8 KiB
//! buffers and a few kilobyte-sized header maps, which miss glibc's per-thread cache and
//! cost a walk of its bins, then a consolidation when freed. Measured with callgrind on
//! 2026-11-22 (bench/README.md has the method), jemalloc against glibc:
//!
//! - one request per connection: 57 900 → 50 600 instructions per request (−13 %);
//! - keep-alive requests: 36 900 → 35 800 (−3 %);
//! - memory per held request (4 000 and 8 000 held): 29.2 → 25.9 KiB.
//!
//! mimalloc 3.3 saved as much on new connections (49 000) but little on keep-alive
//! (36 500), and took more memory: 33.2 KiB per held request with transparent huge pages
//! off, 53.8 KiB with them on. `--no-default-features` builds with the system allocator.

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    cutoff::cli::main()
}
