//! The `portcullis` binary: the command line lives in `portcullis::cli`.
fn main() -> std::process::ExitCode {
    portcullis::cli::main()
}
