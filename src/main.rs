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

/// jemalloc's options, read when it starts (`_RJEM_MALLOC_CONF` in the environment still
/// overrides them).
///
/// hyper gives every client connection an 8 KiB read buffer and an 8 KiB write buffer,
/// and every upstream connection two more. By default jemalloc makes each 8 KiB block a
/// slab of its own (an extent, with its own descriptor and page-map entries) and caches
/// 20 of them per thread. A batch of connections that closes together overflows that
/// cache, the blocks go back as whole extents, and the next batch gets them back one
/// extent operation each: jemalloc took 8 100 of a one-request connection's 50 400
/// instructions, against 1 100 of a keep-alive request's 35 000. In slabs of 64 pages
/// (32 blocks) they come and go inside a slab, the thread caches 64 of them, and a held
/// request carries less bookkeeping. The cache's garbage collection runs every 4 MiB
/// allocated instead of every 64 KiB, so that it does not hand the blocks back between
/// two batches.
///
/// Measured on 2026-12-08 (callgrind and `bench/run.sh` sections, wrk -c64):
/// - one request per connection: 50 400 → 45 700–46 000 instructions per request, and
///   55 600 → 49 600 with 512 connections;
/// - keep-alive, whose buffers live as long as their connection: 35 000 before and after;
/// - memory per held request (9 000 held): 18.4–18.8 → 17.6–18.3 KiB; after a 64 KiB
///   upload 27.9–28.1 → 27.2–27.3.
///
/// jemalloc hands freed memory back to the system over 10 s (its decay), but without its
/// background thread that clock only advances when the process allocates or frees: an
/// idle proxy kept what a burst took. 9 000 held requests took VmRSS to 160 MiB, and it
/// stayed at 141–160 MiB over the 25 s after their release; with the thread it was back
/// to 15 MiB within 10 s. The thread woke about once a second under load and used no
/// measurable CPU (0 clock ticks over 10 s of wrk); instructions per request unchanged.
///
/// Measured and not taken: 200 cache slots for every size class instead (44 800
/// instructions, but 18.5 KiB per held request); `dirty_decay_ms:1000` beside the thread
/// (the memory back at once, but purged ten times as eagerly while serving).
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&'static u8> =
    Some(&b"background_thread:true,slab_sizes:8192-8192:64,tcache_gc_incr_bytes:4194304\0"[0]);

fn main() -> std::process::ExitCode {
    cutoff::cli::main()
}
