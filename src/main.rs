#![forbid(unsafe_code)]

// Many small, short-lived allocations per request (header maps, body frames, futures) across
// threads: mimalloc measured cheaper per request than the system allocator (benches/compare.sh).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sidecar::cli::main()
}
