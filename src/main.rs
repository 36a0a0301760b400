fn main() -> std::process::ExitCode {
    pagellm::cli::main()
}
