//! Bad traffic against a broker: each offender gets a clear error frame and is disconnected,
//! while a well-behaved client on another connection keeps working and nothing stored is
//! lost.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures_util::{SinkExt, StreamExt};
use queue_core::{Queue, VirtualClock, channel};
use queue_runtime::ConnectOptions;
use queue_runtime::adapters::file::{FileAdapter, FileOptions};
use queue_runtime::broker::protocol::{self, ClientFrame, Request, ServerFrame};
use queue_runtime::broker::{Broker, BrokerConfig};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

#[channel("bad/keep")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keep {
    pub n: u32,
}

struct Setup {
    addr: std::net::SocketAddr,
    broker: Arc<Broker>,
    _dir: tempfile::TempDir,
}

async fn setup(config: BrokerConfig) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(VirtualClock::default());
    let options = FileOptions {
        segment_size: 1 << 16,
        ..FileOptions::default()
    };
    let adapter = FileAdapter::open(dir.path(), clock, options).unwrap();
    let broker = Broker::new(adapter, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(broker.clone().serve_tcp(listener));
    Setup {
        addr,
        broker,
        _dir: dir,
    }
}

async fn client(addr: std::net::SocketAddr, token: Option<&str>) -> Queue {
    let url = match token {
        Some(t) => format!("queue://{addr}?token={t}"),
        None => format!("queue://{addr}"),
    };
    queue_runtime::connect_with(
        &url,
        ConnectOptions::with_clock(Arc::new(VirtualClock::default())),
    )
    .await
    .unwrap()
}

fn framed(stream: TcpStream) -> Framed<TcpStream, LengthDelimitedCodec> {
    Framed::new(
        stream,
        LengthDelimitedCodec::builder()
            .max_frame_length(64 << 20)
            .new_codec(),
    )
}

fn hello(token: Option<&str>) -> bytes::Bytes {
    protocol::encode(&ClientFrame {
        id: 1,
        request: Request::Hello {
            version: protocol::VERSION,
            token: token.map(Into::into),
            client: "test".into(),
        },
    })
    .unwrap()
}

/// Reads frames until the server closes, returning the connection-level error it sent.
async fn closing_error(f: &mut Framed<TcpStream, LengthDelimitedCodec>) -> (String, String) {
    let mut error = None;
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(bytes)) = f.next().await {
            if let Ok(ServerFrame::Error { id: 0, error: e }) =
                protocol::decode::<ServerFrame>(&bytes)
            {
                error = Some((e.code, e.message));
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server did not close the connection");
    error.expect("an error frame before the close")
}

async fn still_serving(queue: &Queue, expected: u64) {
    Keep::produce(queue, Keep { n: 0 })
        .await
        .expect("the good client is unaffected");
    let stats = queue.stats().await.unwrap();
    let ready = stats
        .iter()
        .find(|s| s.channel == "bad/keep")
        .map_or(0, |s| s.ready);
    assert_eq!(ready, expected, "nothing stored was lost");
}

#[tokio::test]
async fn malformed_unknown_oversized_and_unauthenticated_traffic_is_refused_alone() {
    let s = setup(BrokerConfig {
        token: Some("s3cret".into()),
        max_frame: 64 * 1024,
        handshake_timeout: Duration::from_millis(300),
        ..BrokerConfig::default()
    })
    .await;
    let good = client(s.addr, Some("s3cret")).await;
    Keep::produce(&good, Keep { n: 1 }).await.unwrap();
    let mut stored = 1;

    // Not BSON at all, after a good handshake.
    let mut f = framed(TcpStream::connect(s.addr).await.unwrap());
    f.send(hello(Some("s3cret"))).await.unwrap();
    f.send(bytes::Bytes::from_static(b"\x01\x02garbage"))
        .await
        .unwrap();
    let (code, message) = closing_error(&mut f).await;
    assert_eq!(code, "bad_frame", "{message}");
    assert!(message.contains("malformed frame"), "{message}");
    still_serving(&good, {
        stored += 1;
        stored
    })
    .await;

    // Valid BSON, unknown operation.
    let mut f = framed(TcpStream::connect(s.addr).await.unwrap());
    f.send(hello(Some("s3cret"))).await.unwrap();
    let unknown = bson::serialize_to_vec(&bson::doc! { "id": 2_i64, "op": "format_disk" }).unwrap();
    f.send(bytes::Bytes::from(unknown)).await.unwrap();
    let (code, _) = closing_error(&mut f).await;
    assert_eq!(code, "bad_frame");
    still_serving(&good, {
        stored += 1;
        stored
    })
    .await;

    // A frame that announces 1 GiB: refused from its length alone.
    let mut raw = TcpStream::connect(s.addr).await.unwrap();
    let mut buf = BytesMut::new();
    buf.put_u32(1 << 30);
    buf.put_slice(b"only a little");
    raw.write_all(&buf).await.unwrap();
    let mut f = framed(raw);
    let (code, message) = closing_error(&mut f).await;
    assert_eq!(code, "frame_too_large", "{message}");
    still_serving(&good, {
        stored += 1;
        stored
    })
    .await;

    // A wrong token.
    let mut f = framed(TcpStream::connect(s.addr).await.unwrap());
    f.send(hello(Some("guess"))).await.unwrap();
    let (code, _) = closing_error(&mut f).await;
    assert_eq!(code, "unauthorized");
    let err = queue_runtime::connect(&format!("queue://{}?token=guess", s.addr))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unauthorized"), "{err}");

    // A request before the handshake.
    let mut f = framed(TcpStream::connect(s.addr).await.unwrap());
    f.send(
        protocol::encode(&ClientFrame {
            id: 1,
            request: Request::Stats,
        })
        .unwrap(),
    )
    .await
    .unwrap();
    let (code, _) = closing_error(&mut f).await;
    assert_eq!(code, "handshake");

    // A handshake that never comes.
    let mut silent = TcpStream::connect(s.addr).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a silent client is disconnected");
    assert!(
        String::from_utf8_lossy(&rest).contains("no handshake"),
        "{rest:?}"
    );

    still_serving(&good, {
        stored += 1;
        stored
    })
    .await;
    assert!(
        s.broker
            .counters
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 6
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_with_an_error() {
    let s = setup(BrokerConfig {
        max_connections: 2,
        ..BrokerConfig::default()
    })
    .await;
    let a = client(s.addr, None).await;
    let _b = client(s.addr, None).await;
    let mut f = framed(TcpStream::connect(s.addr).await.unwrap());
    let (code, _) = closing_error(&mut f).await;
    assert_eq!(code, "too_many_connections");
    still_serving(&a, 1).await;
}

#[tokio::test]
async fn a_closed_connection_gives_its_leases_to_another_worker_at_once() {
    let s = setup(BrokerConfig::default()).await;
    let producer = client(s.addr, None).await;
    Keep::produce(&producer, Keep { n: 7 }).await.unwrap();
    let dying = client(s.addr, None).await;
    let sub = dying
        .adapter()
        .subscribe(&<KeepChannel as queue_core::Channel>::SPEC, 1)
        .await
        .unwrap();
    let held = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    // The connection goes away without settling (as a killed worker's would).
    dying.close().await.unwrap();
    drop(sub);
    let other = client(s.addr, None).await;
    let sub = other
        .adapter()
        .subscribe(&<KeepChannel as queue_core::Channel>::SPEC, 1)
        .await
        .unwrap();
    let again = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("redelivered")
        .unwrap();
    assert_eq!(again.lease.id, held.lease.id);
    assert!(again.lease.token > held.lease.token);
}

#[tokio::test]
async fn a_stale_lease_among_settles_sent_together_fails_alone() {
    let s = setup(BrokerConfig::default()).await;
    let queue = client(s.addr, None).await;
    for n in 0..3 {
        Keep::produce(&queue, Keep { n }).await.unwrap();
    }
    let spec = <KeepChannel as queue_core::Channel>::SPEC;
    let sub = queue.adapter().subscribe(&spec, 3).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap()
            .unwrap();
        held.push(d.lease);
    }
    let mut stale = held[1].clone();
    stale.token += 1;
    // Made together, the three settles travel in one request.
    let adapter = queue.adapter();
    let (a, b, c) = tokio::join!(
        adapter.settle(&held[0], queue_core::Outcome::Ack),
        adapter.settle(&stale, queue_core::Outcome::Ack),
        adapter.settle(&held[2], queue_core::Outcome::Ack),
    );
    assert!(a.is_ok() && c.is_ok(), "{a:?} {c:?}");
    assert!(
        matches!(b, Err(queue_core::QueueError::StaleLease { id }) if id == stale.id),
        "{b:?}"
    );
    let stats = queue.stats().await.unwrap();
    let keep = stats.iter().find(|s| s.channel == "bad/keep").unwrap();
    assert_eq!((keep.acked, keep.in_flight), (2, 1));
}

#[tokio::test]
async fn a_tls_broker_serves_a_tls_client_and_refuses_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let acceptor = queue_runtime::broker::tls::acceptor(&cert_path, &key_path).unwrap();

    let clock = Arc::new(VirtualClock::default());
    let store = dir.path().join("store");
    let adapter = FileAdapter::open(
        &store,
        clock,
        FileOptions {
            segment_size: 1 << 16,
            ..FileOptions::default()
        },
    )
    .unwrap();
    let broker = Broker::new(
        adapter,
        BrokerConfig {
            handshake_timeout: Duration::from_millis(500),
            ..BrokerConfig::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(broker.clone().serve_tls(listener, acceptor));

    let url = format!("queue+tls://localhost:{port}?ca={}", cert_path.display());
    let queue = queue_runtime::connect(&url).await.expect("a tls client");
    let receipt = Keep::produce(&queue, Keep { n: 3 }).await.unwrap();
    let sub = queue
        .adapter()
        .subscribe(&<KeepChannel as queue_core::Channel>::SPEC, 1)
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.lease.id, receipt.id);

    // Plain text to a TLS port gets nowhere, and the broker keeps serving.
    let mut plain = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    plain.write_all(&hello(None)).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a plain-text client is disconnected");
    assert!(Keep::produce(&queue, Keep { n: 4 }).await.is_ok());
    broker.shutdown();
}
