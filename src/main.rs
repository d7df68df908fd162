//! The `strata` command: a thin entry point into [`engine::cli`].

fn main() -> std::process::ExitCode {
    engine::cli::main()
}
