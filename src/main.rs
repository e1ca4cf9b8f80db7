#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    sidecar::app::main()
}
