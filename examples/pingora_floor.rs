//! The floor: a Pingora 0.9 proxy with nothing in it (no filters, no
//! audit, no body handling), on the gateway's server settings, forwarding
//! every request to one upstream. Run it beside the gateway to see what
//! Pingora itself costs on a machine, per request and per open stream:
//!
//! ```text
//! cargo run --release --example pingora_floor -- 127.0.0.1:9300 127.0.0.1:9100 &
//! load-tests/run.sh chat --mock-listen 127.0.0.1:9100 \
//!     --target http://127.0.0.1:9300/v1 --target-pid $!
//! ```

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Floor {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: pingora_floor LISTEN UPSTREAM   (both host:port)");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads: 2,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Floor { upstream });
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
