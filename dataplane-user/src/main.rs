//! The `dataplane` binary: everything is in the library's `cli` module, so
//! the tests parse and run the same command line.

fn main() -> anyhow::Result<()> {
    dataplane::cli::main()
}
