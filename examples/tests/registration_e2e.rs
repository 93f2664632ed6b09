//! End to end, with real processes: a `queue-broker`, the example's `app` and its `worker`.
//! `POST /users` produces `UserRegistered`; the worker stores the user once; the same POST
//! again inside the 1 s dedup window answers the first message id and is not handled again;
//! a bad body is refused without producing anything; both processes stop cleanly on SIGTERM.
//!
//! Run it with `cargo test -p examples --test registration_e2e`. The broker binary comes
//! from `QUEUE_BROKER_BIN` or the test's own `target/<profile>/` directory, where it is built
//! with `cargo build -p queue-runtime --bin queue-broker` when missing.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use examples::services::{Database, Record};
use queue_runtime::{ChannelStats, Queue};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The longest any one wait in this test may take.
const PATIENCE: Duration = Duration::from_secs(30);

/// A child process, killed when dropped; its output goes to a log file that is printed when
/// the test fails.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, command: &mut Command, logs: &Path) -> Proc {
        let log = logs.join(format!("{name}.log"));
        let out = File::create(&log).expect("creating a log file");
        let err = out.try_clone().expect("cloning a log file handle");
        let child = command
            .env_remove("QUEUE_TOKEN")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc { name, child, log }
    }

    /// Panics with the process's log when it has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited early ({status}); its log:\n{}",
                self.name,
                self.log_text()
            );
        }
    }

    /// Sends SIGTERM and waits, bounded, for the process to exit.
    fn terminate(&mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        assert!(
            sent.is_ok_and(|s| s.success()),
            "cannot send SIGTERM to {}",
            self.name
        );
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for a child") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop within {PATIENCE:?} of SIGTERM; its log:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(8000);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- {} log (last 8000 bytes) ----\n{}",
                self.name,
                self.log_text()
            );
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("finding a free port")
        .port()
}

/// The `queue-broker` binary: `QUEUE_BROKER_BIN`, or the one beside this test's profile
/// directory, built once when missing.
fn broker_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("QUEUE_BROKER_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("locating the test executable");
    // target/<profile>/deps/registration_e2e-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let binary = profile_dir.join(format!("queue-broker{}", std::env::consts::EXE_SUFFIX));
    if binary.exists() {
        return binary;
    }
    let target_dir = profile_dir
        .parent()
        .expect("the profile directory lives in the target directory");
    let mut build = Command::new(option_env!("CARGO").unwrap_or("cargo"));
    build
        .args(["build", "-p", "queue-runtime", "--bin", "queue-broker"])
        .arg("--target-dir")
        .arg(target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            build.arg("--release");
        }
        Some(profile) => {
            build.args(["--profile", profile]);
        }
    }
    let status = build
        .status()
        .expect("running cargo build for queue-broker");
    assert!(status.success(), "cargo build of queue-broker failed");
    assert!(
        binary.exists(),
        "{} is still missing after the build; set QUEUE_BROKER_BIN",
        binary.display()
    );
    binary
}

/// Polls `check` every 20 ms until it returns `Some`, for at most [`PATIENCE`], checking
/// that the processes are still running.
async fn wait_for<T>(
    what: &str,
    procs: &mut [&mut Proc],
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        for p in procs.iter_mut() {
            p.assert_running();
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One HTTP/1.1 request; returns the status and the body parsed as JSON.
async fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        std::io::Result::Ok(response)
    };
    let response = tokio::time::timeout(PATIENCE, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no response within {PATIENCE:?}"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let text = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: no header end in {text:?}"));
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{method} {path}: unexpected chunked response {text:?}"
    );
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: bad status line in {text:?}"));
    let json = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{method} {path}: body {body:?} is not JSON: {e}"));
    (status, json)
}

async fn post_user(port: u16, id: u64, username: &str) -> (u64, bool) {
    let body = json!({ "id": id, "username": username }).to_string();
    let (status, json) = http(port, "POST", "/users", Some(&body)).await;
    assert_eq!(status, 202, "POST /users {body}: {json}");
    let message_id = json["message_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no message_id in {json}"));
    let duplicate = json["duplicate"]
        .as_bool()
        .unwrap_or_else(|| panic!("no duplicate in {json}"));
    (message_id, duplicate)
}

/// The rows about user `id`: (user rows, welcome mail rows).
fn rows_for(db: &Path, id: u64) -> (Vec<Record>, Vec<Record>) {
    let rows = Database::read(db).expect("reading the worker's database");
    let users = rows
        .iter()
        .filter(|r| matches!(r, Record::User { id: i, .. } if *i == id))
        .cloned()
        .collect();
    let mails = rows
        .iter()
        .filter(|r| matches!(r, Record::WelcomeMail { user_id, .. } if *user_id == id))
        .cloned()
        .collect();
    (users, mails)
}

/// Waits until user `id` is stored and mailed, lets 300 ms pass for any second handling to
/// show, then checks it was handled exactly once, from message `message_id`.
async fn assert_handled_once(
    db: &Path,
    id: u64,
    username: &str,
    message_id: u64,
    procs: &mut [&mut Proc],
) {
    wait_for(
        &format!("user {id} to be stored and mailed"),
        procs,
        async || {
            let (users, mails) = rows_for(db, id);
            (!users.is_empty() && !mails.is_empty()).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (users, mails) = rows_for(db, id);
    assert_eq!(
        users,
        vec![Record::User {
            message_id,
            attempt: 1,
            id,
            username: username.into(),
        }],
        "user {id} must be stored exactly once"
    );
    assert_eq!(mails.len(), 1, "user {id} must be mailed once: {mails:?}");
}

async fn stats(queue: &Queue, channel: &str) -> ChannelStats {
    queue
        .stats()
        .await
        .expect("reading stats from the broker")
        .into_iter()
        .find(|s| s.channel == channel)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_posted_user_is_handled_once_and_a_duplicate_post_is_not_handled_again() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let db = dir.path().join("example-db.jsonl");
    let broker_port = free_port();
    let app_port = free_port();
    let url = format!("queue://127.0.0.1:{broker_port}");

    let mut broker = Proc::spawn(
        "queue-broker",
        Command::new(broker_binary())
            .args(["--listen", &format!("127.0.0.1:{broker_port}")])
            .arg("--data")
            .arg(dir.path().join("broker-data"))
            .args(["--segment-size", "1048576"])
            .env("RUST_LOG", "warn"),
        dir.path(),
    );
    wait_for("the broker to listen", &mut [&mut broker], async || {
        tokio::net::TcpStream::connect(("127.0.0.1", broker_port))
            .await
            .ok()
    })
    .await;
    let queue = queue_runtime::connect(&url)
        .await
        .expect("connecting to the broker");

    let mut worker = Proc::spawn(
        "worker",
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .env("QUEUE_URL", &url)
            .env("EXAMPLE_DB", &db)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1"),
        dir.path(),
    );
    let mut app = Proc::spawn(
        "app",
        Command::new(env!("CARGO_BIN_EXE_app"))
            .env("QUEUE_URL", &url)
            .env("APP_ADDR", format!("127.0.0.1:{app_port}"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1"),
        dir.path(),
    );
    wait_for(
        "the worker to subscribe",
        &mut [&mut broker, &mut worker],
        async || (stats(&queue, "user/registered").await.consumers > 0).then_some(()),
    )
    .await;
    wait_for(
        "the app to listen",
        &mut [&mut broker, &mut app],
        async || {
            tokio::net::TcpStream::connect(("127.0.0.1", app_port))
                .await
                .ok()
        },
    )
    .await;
    assert_eq!(
        http(app_port, "GET", "/healthz", None).await,
        (200, json!({ "status": "ok" }))
    );

    // A new user is produced; the same POST right after is a duplicate of it.
    let posted = Instant::now();
    let (peter, duplicate) = post_user(app_port, 1, "Peter").await;
    assert!(!duplicate, "the first POST is not a duplicate");
    let (again, duplicate) = post_user(app_port, 1, "Peter").await;
    let apart = posted.elapsed();
    assert!(
        duplicate && again == peter,
        "a POST {apart:?} after the first (window 1 s) answered message {again}, duplicate = {duplicate}; expected message {peter}, duplicate = true"
    );
    let procs = &mut [&mut broker, &mut worker, &mut app];
    assert_handled_once(&db, 1, "Peter", peter, procs).await;

    // Another user is handled too.
    let (alice, duplicate) = post_user(app_port, 2, "Alice").await;
    assert!(
        !duplicate && alice != peter,
        "a different user is a new message"
    );
    assert_handled_once(&db, 2, "Alice", alice, procs).await;

    // Bad bodies are refused with a reason, and produce nothing.
    for (body, status) in [
        (r#"{"id": "one", "username": "Bob"}"#, 422),
        (r#"{"id": 3}"#, 422),
        (r#"{"id": 3, "username": " "}"#, 422),
        ("not json", 400),
    ] {
        let (got, json) = http(app_port, "POST", "/users", Some(body)).await;
        assert_eq!(got, status, "POST /users {body}: {json}");
        assert!(
            json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "POST /users {body}: no error text in {json}"
        );
    }

    let users = stats(&queue, "user/registered").await;
    assert_eq!(
        (users.produced, users.duplicates, users.acked, users.dead),
        (2, 1, 2, 0),
        "user/registered: {users:?}"
    );
    let mails = stats(&queue, "mail/welcome").await;
    assert_eq!(
        (mails.produced, mails.acked, mails.dead),
        (2, 2, 0),
        "mail/welcome: {mails:?}"
    );
    assert_eq!(
        Database::read(&db).expect("reading the database").len(),
        4,
        "two users stored and two mails sent, nothing else"
    );

    // SIGTERM stops the app and the worker cleanly.
    for p in [&mut app, &mut worker] {
        let status = p.terminate();
        assert!(
            status.success(),
            "{} exited with {status} on SIGTERM; its log:\n{}",
            p.name,
            p.log_text()
        );
    }
}
