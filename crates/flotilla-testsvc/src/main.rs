//! `flotilla-testsvc`: see the library docs for the endpoints and knobs.

use clap::Parser;
use flotilla_testsvc::{serve, Args};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    eprintln!(
        "flotilla-testsvc {} listening on {}",
        args.name, args.listen
    );
    rt.block_on(serve(args))
}
