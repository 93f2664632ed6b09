//! The dashboard in headless Chromium: a real `queue-broker --http` with seeded channels,
//! driven by `tests/dashboard/browser.mjs` (Playwright). The pages load with data, a redrive
//! from the page moves the messages, and the read-only token cannot act.
//!
//! Runs when Chromium (`/usr/bin/chromium`, or `CHROMIUM`) and the script's modules
//! (`npm ci --prefix queue-runtime/tests/dashboard`) are installed, as `.ci/run` does; with
//! `QUEUE_TEST_BROWSER=1` their absence fails the test. Screenshots go to
//! `QUEUE_TEST_SCREENSHOTS` (default `target/dashboard-screenshots`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use queue_core::{ChannelSpec, Outcome, Outgoing, Queue, codec};
use serde_json::{Value, json};

const ADMIN: &str = "admin-secret";
const VIEWER: &str = "viewer-secret";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_broker(data: &Path, port: u16, http: u16) -> Broker {
    let child = Command::new(env!("CARGO_BIN_EXE_queue-broker"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(data)
        .args(["--http", &format!("127.0.0.1:{http}")])
        .args(["--http-token", ADMIN, "--http-read-token", VIEWER])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("starting queue-broker");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err() {
        assert!(Instant::now() < deadline, "queue-broker did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Broker(child)
}

fn outgoing(doc: Value) -> Outgoing {
    Outgoing {
        payload: codec::encode(&bson::Bson::try_from(doc).unwrap()).unwrap(),
        dedup_key: None,
        delay: Duration::ZERO,
        priority: 0,
        group: None,
    }
}

/// `dash/orders`: 3 ready messages, declared with `lease` 30s and `max_attempts` 5.
/// `dash/mail`: 3 dead letters, two "smtp down" and one "bad address".
async fn seed(queue: &Queue) {
    let orders = ChannelSpec {
        lease: Duration::from_secs(30),
        max_attempts: 5,
        ..ChannelSpec::new("dash/orders")
    };
    let batch = (1..=3).map(|n| outgoing(json!({ "n": n }))).collect();
    queue.produce_raw(&orders, batch).await.unwrap();
    let mail = ChannelSpec {
        max_attempts: 1,
        ..ChannelSpec::new("dash/mail")
    };
    let batch = ["a@x", "b@x", "c@x"]
        .iter()
        .map(|to| outgoing(json!({ "to": to })))
        .collect();
    queue.produce_raw(&mail, batch).await.unwrap();
    let sub = queue.adapter().subscribe(&mail, 3).await.unwrap();
    for _ in 0..3 {
        let d = sub.next().await.unwrap();
        let to = codec::decode_value(&d.payload).unwrap();
        let to = to.as_document().unwrap().get_str("to").unwrap().to_string();
        let error = if to == "c@x" {
            "bad address"
        } else {
            "smtp down"
        };
        let retry = Outcome::Retry {
            after: None,
            error: error.into(),
        };
        queue.adapter().settle(&d.lease, retry).await.unwrap();
    }
    sub.stop().await;
}

/// What the test needs to drive a browser, or why it is missing.
fn browser() -> Result<(PathBuf, PathBuf), String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Err(format!("no Chromium at {chromium}"));
    }
    if !dir.join("node_modules/playwright-core").exists() {
        return Err(format!(
            "playwright-core is not installed: npm ci --prefix {}",
            dir.display()
        ));
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Err("node is not installed".into());
    }
    Ok((dir.join("browser.mjs"), PathBuf::from(chromium)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_a_browser() {
    let (script, chromium) = match browser() {
        Ok(found) => found,
        Err(why) if std::env::var("QUEUE_TEST_BROWSER").as_deref() != Ok("1") => {
            eprintln!("the browser test did not run: {why}");
            return;
        }
        Err(why) => panic!("QUEUE_TEST_BROWSER=1 but {why}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let (port, http) = (free_port(), free_port());
    let _broker = start_broker(dir.path(), port, http);
    let queue = queue_runtime::connect(&format!("queue://127.0.0.1:{port}"))
        .await
        .unwrap();
    seed(&queue).await;

    let shots = std::env::var("QUEUE_TEST_SCREENSHOTS").map_or_else(
        |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard-screenshots"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&shots).unwrap();
    let base = format!("http://127.0.0.1:{http}");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(&script)
            .args([&base, ADMIN, VIEWER])
            .arg(&shots)
            .env("CHROMIUM", &chromium)
            .output()
            .expect("running node")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser script failed:\n{stdout}\n{stderr}"
    );

    // What the page did is in the store: the "smtp down" group was redriven from the page,
    // one message was produced from its form, and the viewer moved nothing.
    let stats = queue.stats().await.unwrap();
    let of = |name: &str| stats.iter().find(|s| s.channel == name).unwrap().clone();
    let (mail, orders) = (of("dash/mail"), of("dash/orders"));
    assert_eq!((mail.ready, mail.dead), (2, 1), "{mail:?}");
    assert_eq!((orders.ready, orders.paused), (4, false), "{orders:?}");
    queue.close().await.unwrap();
}
