//! `flotilla-testsvc`: see the library docs for the endpoints and knobs.

use clap::Parser;
use flotilla_testsvc::{serve, Args};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(us) = args.burn_us {
        // A `--fork` child: the request's work, then exit.
        flotilla_testsvc::burn(us);
        return Ok(());
    }
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
