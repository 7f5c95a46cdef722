//! `portcullis mock-provider`: the mock provider on its own.

use super::finish;
use crate::testkit::mock::{self, MockOptions, MockState};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

pub fn run(listen: SocketAddr, options: MockOptions) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portcullis: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    finish(runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        println!("mock provider listening on http://{listen}/v1");
        let stop = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        };
        mock::serve(listener, options, Arc::new(MockState::default()), stop).await;
        Ok(())
    }))
}
