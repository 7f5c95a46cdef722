//! One rate-limit decision through Redis (the Lua GCRA script), against a
//! `redis-server` this bench starts on a free port. Run:
//! `cargo bench --bench redis_limits`.

use criterion::{criterion_group, criterion_main, Criterion};
use filters::rate_limit::{Charge, LimitStore};
use portcullis::stores::redis_limits::RedisLimits;
use std::process::{Command, Stdio};
use std::time::Duration;

fn redis(c: &mut Criterion) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Ok(mut server) = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
    else {
        eprintln!("redis-server not installed: skipping the Redis bench");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = RedisLimits::new(
        &format!("redis://127.0.0.1:{port}"),
        Duration::from_millis(500),
    )
    .unwrap();
    let charges = vec![
        Charge {
            key: "bench:req".into(),
            cost: 1.0,
            emission_ms: 1e-6,
            burst: 1e12,
            force: false,
        },
        Charge {
            key: "bench:tok".into(),
            cost: 70.0,
            emission_ms: 1e-6,
            burst: 1e12,
            force: false,
        },
    ];
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as f64
    };
    rt.block_on(async {
        for _ in 0..100 {
            if store.apply(&charges, now(), true).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    c.bench_function(
        "rate limit decision (Redis, 2 keys, one script call)",
        |b| {
            b.to_async(&rt)
                .iter(|| async { store.apply(&charges, now(), true).await.unwrap() })
        },
    );
    let _ = server.kill();
    let _ = server.wait();
}

criterion_group!(benches, redis);
criterion_main!(benches);
