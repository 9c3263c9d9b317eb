//! The `cutoff` binary: parses the command line and hands over to the library.

/// mimalloc rather than the system allocator: per-request allocations (hyper's buffers,
/// the guard, the body wrapper) are freed on the same thread that made them, which
/// mimalloc's thread-local free lists serve without locks, and it returns freed pages to
/// the OS, so memory goes back down after a burst of held requests.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cutoff::cli::main()
}
