//! TLS to PostgreSQL with each `sslmode`, against a cluster of its own that has `ssl=on` and
//! accepts TLS connections only (`hostssl` in `pg_hba.conf`), with a certificate authority
//! and a server certificate for `localhost` made here with rcgen.
//!
//! Needs the PostgreSQL server binaries (`/usr/lib/postgresql/*/bin`); run as root, the
//! cluster runs as the `postgres` user, as in `.ci/run`. Without them the test fails: it
//! never passes by skipping.

use std::path::{Path, PathBuf};
use std::process::Command;

use queue_runtime::adapters::postgres::Postgres;

fn server_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("bin"))
        .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: this test starts a cluster of its own")
    })
}

fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a server binary, as the `postgres` user when running as root.
fn run(bin: &Path, args: &[&str]) {
    let mut cmd = if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let out = cmd.args(args).output().expect("running a server binary");
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway cluster that takes TLS connections only; stopped when dropped.
struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(dir: tempfile::TempDir, cert_pem: &str, key_pem: &str) -> Self {
        let bin = server_bin();
        let data = dir.path().join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if as_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the cluster directory");
        }
        run(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        for (name, text) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = data.join(name);
            std::fs::write(&path, text).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )
        .unwrap();
        if as_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data)
                .status()
                .unwrap()
                .success();
            assert!(ok);
        }
        let options = format!(
            "-p {port} -k {} -c listen_addresses=localhost -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key",
            dir.path().display()
        );
        run(
            &bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                dir.path().join("server.log").to_str().unwrap(),
                "-w",
                "-o",
                &options,
                "start",
            ],
        );
        Cluster {
            bin,
            data,
            port,
            _dir: dir,
        }
    }

    fn url(&self, host: &str, query: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/postgres?schema=tls_test&{query}",
            self.port
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        run(
            &self.bin.join("pg_ctl"),
            &["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"],
        );
    }
}

/// A certificate authority named `ca_name` and a certificate for `localhost` it signed.
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn make_pki(ca_name: &str) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// The error with every cause, as a log line shows it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Connects, and answers whether the pool's connections run over TLS.
async fn encrypted(url: &str) -> Result<bool, String> {
    let queue = queue_runtime::connect(url).await.map_err(|e| chain(&e))?;
    let pg = Postgres::of(&queue).unwrap();
    let client = pg.pool().get().await.map_err(|e| chain(&e))?;
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| chain(&e))?
        .get(0);
    drop(client);
    let _ = queue.close().await;
    Ok(ssl)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sslmode_connects_or_fails_clearly_against_a_server_that_takes_tls_only() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki("queue test CA");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let wrong = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong, make_pki("another CA").ca_pem).unwrap();
    let ca = ca.display().to_string();
    let wrong = wrong.display().to_string();
    let cluster = Cluster::start(dir, &pki.cert_pem, &pki.key_pem);

    assert_eq!(
        encrypted(&cluster.url("127.0.0.1", "sslmode=require")).await,
        Ok(true),
        "require: encrypted, certificate not checked"
    );
    assert_eq!(
        encrypted(&cluster.url("127.0.0.1", "")).await,
        Ok(true),
        "prefer (the default): encrypted when the server offers it"
    );
    assert_eq!(
        encrypted(&cluster.url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}")
        ))
        .await,
        Ok(true),
        "verify-full with the right authority and name"
    );
    assert_eq!(
        encrypted(&cluster.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"))).await,
        Ok(true),
        "verify-ca does not check the name"
    );

    let refused = |url: String| async move {
        encrypted(&url)
            .await
            .expect_err(&format!("{url} must not connect"))
    };
    let e = refused(cluster.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={wrong}"),
    ))
    .await;
    assert!(
        e.contains("invalid peer certificate") && e.contains("UnknownIssuer"),
        "verify-full with another authority: {e}"
    );
    let e =
        refused(cluster.url("localhost", &format!("sslmode=require&sslrootcert={wrong}"))).await;
    assert!(
        e.contains("UnknownIssuer"),
        "require with sslrootcert checks as verify-ca: {e}"
    );
    let e = refused(cluster.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    assert!(
        e.contains("certificate not valid for name \"127.0.0.1\""),
        "verify-full to a name the certificate lacks: {e}"
    );
    let e = refused(cluster.url("127.0.0.1", "sslmode=disable")).await;
    assert!(
        e.contains("no pg_hba.conf entry") && e.contains("no encryption"),
        "disable against a server that takes TLS only: {e}"
    );
    let e = refused(cluster.url("127.0.0.1", "sslmode=verify-full")).await;
    assert!(e.contains("sslrootcert"), "verify-full needs a root: {e}");
}
