//! https providers: SNI and certificate verification are on.
//!
//! A test CA signs a certificate for `localhost`; a TLS terminator in front
//! of the mock presents it. The gateway trusts the CA only when it is given
//! through `SSL_CERT_FILE` (read by the platform certificate loader).

use crate::support::*;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_rustls::rustls;

struct TestPki {
    ca_pem: String,
    server_config: Arc<rustls::ServerConfig>,
}

fn pki() -> TestPki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Portcullis test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TestPki {
        ca_pem: ca.pem(),
        server_config: Arc::new(server_config),
    }
}

/// Terminate TLS on a free port and pass the plaintext to `backend`.
async fn tls_front(config: Arc<rustls::ServerConfig>, backend: SocketAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    addr
}

async fn gateway_for(url: String, ca_file: Option<&std::path::Path>, mock: &Mock) -> Gateway {
    let mut setup = Setup::new(mock.addr);
    setup.provider_url = Some(url);
    if let Some(ca) = ca_file {
        setup
            .env
            .push(("SSL_CERT_FILE".into(), ca.display().to_string()));
    }
    Gateway::start(setup).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_provider_with_a_trusted_certificate_works_and_an_untrusted_one_is_refused() {
    let mock = Mock::start(options()).await;
    let pki = pki();
    let front = tls_front(pki.server_config.clone(), mock.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();

    // Trusted CA, matching host name: served.
    let gw = gateway_for(
        format!("https://localhost:{}/v1", front.port()),
        Some(&ca_file),
        &mock,
    )
    .await;
    let r = gw.post("/v1/chat/completions", &chat("over tls")).await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "over tls");
    assert_eq!(
        mock.state.last_request().unwrap().header("host"),
        Some(&*format!("localhost:{}", front.port()))
    );
    drop(gw);

    // Same certificate, CA not trusted: refused before anything is sent.
    let before = mock.state.requests().len();
    let gw = gateway_for(
        format!("https://localhost:{}/v1", front.port()),
        None,
        &mock,
    )
    .await;
    let r = gw.post("/v1/chat/completions", &chat("x")).await;
    let id = expect_error(r, 502, "upstream_error").await;
    let rec = gw.record_for(&id).await;
    assert_eq!(rec["decision"], "error");
    drop(gw);

    // Trusted CA but the certificate does not name the host: refused.
    let gw = gateway_for(
        format!("https://127.0.0.1:{}/v1", front.port()),
        Some(&ca_file),
        &mock,
    )
    .await;
    let r = gw.post("/v1/chat/completions", &chat("x")).await;
    expect_error(r, 502, "upstream_error").await;
    assert_eq!(
        mock.state.requests().len(),
        before,
        "no request crossed an unverified connection"
    );
}
