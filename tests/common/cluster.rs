//! A PostgreSQL cluster of the test's own, for tests that stop, crash and restart the database:
//! the shared server of `make up` must never go down under the other tests.
//!
//! The cluster is made the way `scripts/stack.sh` makes its private one: the installed `initdb`
//! and `pg_ctl` (from `PATH`, else the newest under `/usr/lib/postgresql/*/bin` or
//! `/usr/pgsql-*/bin`), trust authentication for user `postgres`, TCP on 127.0.0.1 only, a port
//! the system hands out. `initdb` refuses to run as root, so as root the cluster belongs to the
//! `postgres` user. Unlike the stack's cluster it keeps `synchronous_commit` on: a test that kills
//! the server must not lose a transaction the server had confirmed (only `fsync`, which matters
//! when the machine itself crashes, is off). Dropping the cluster stops it and removes its files,
//! pass or fail.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio_postgres::{Client, NoTls};

/// How a stop ends the server's sessions (`pg_ctl stop -m`).
#[derive(Debug, Clone, Copy)]
pub enum StopMode {
    /// Sessions are terminated and the server shuts down cleanly.
    Fast,
    /// The server quits at once, as in a crash; the next start recovers from the WAL.
    Immediate,
}

pub struct PrivateCluster {
    /// Holds the data directory; removed on drop, after the server has stopped.
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PrivateCluster {
    /// Initialises a cluster in a temporary directory and starts it.
    pub async fn start() -> PrivateCluster {
        let bin = pg_bin_dir().unwrap_or_else(|| {
            panic!(
                "no initdb/pg_ctl found (PATH, /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin): \
                 install PostgreSQL's server package"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("sluice-cluster-")
            .tempdir()
            .expect("temp dir");
        if is_root() {
            give_to_postgres(dir.path());
        }
        let cluster = PrivateCluster {
            dir,
            bin,
            port: free_port(),
        };
        let data = cluster.data();
        let initdb = cluster.bin.join("initdb");
        let out = as_owner(&initdb)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
            ])
            .output()
            .await
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let settings = [
            "listen_addresses = '127.0.0.1'".to_owned(),
            format!("port = {}", cluster.port),
            "unix_socket_directories = ''".to_owned(),
            "fsync = off".to_owned(),
            "full_page_writes = off".to_owned(),
            "max_connections = 30".to_owned(),
            "shared_buffers = 16MB".to_owned(),
        ];
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push('\n');
        text.push_str(&settings.join("\n"));
        text.push('\n');
        std::fs::write(&conf, text).expect("write postgresql.conf");
        cluster.resume().await;
        cluster
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub async fn resume(&self) {
        let status = self
            .pg_ctl()
            .args(["-w", "-t", "120", "-l"])
            .arg(self.log())
            .arg("start")
            .status()
            .await
            .expect("run pg_ctl start");
        assert!(
            status.success(),
            "pg_ctl start failed; server log:\n{}",
            std::fs::read_to_string(self.log()).unwrap_or_default()
        );
    }

    /// Stops the server and waits until it has gone.
    pub async fn stop(&self, mode: StopMode) {
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        let status = self
            .pg_ctl()
            .args(["-w", "-t", "60", "-m", mode, "stop"])
            .status()
            .await
            .expect("run pg_ctl stop");
        assert!(status.success(), "pg_ctl stop -m {mode} failed");
    }

    /// A new connection (the server may have restarted since the last one).
    pub async fn client(&self) -> Client {
        let url = self.url();
        let (client, connection) = tokio_postgres::connect(&url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("the test's cluster at {url} does not answer ({e})"));
        tokio::spawn(connection);
        client
    }

    /// One number a query returns, on a new connection.
    pub async fn number(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    fn pg_ctl(&self) -> tokio::process::Command {
        let mut cmd = as_owner(&self.bin.join("pg_ctl"));
        cmd.arg("-D").arg(self.data());
        cmd
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        // Whatever state the test left it in: `stop` on a stopped server fails harmlessly.
        let pg_ctl = self.bin.join("pg_ctl");
        let mut cmd = if is_root() {
            let mut cmd = std::process::Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&pg_ctl);
            cmd
        } else {
            std::process::Command::new(&pg_ctl)
        };
        let _ = cmd
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "30", "-m", "immediate", "stop"])
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `program`, run as the cluster's owner: `postgres` when the test runs as root, else the test's
/// own user. From `/`, which that user can always enter.
fn as_owner(program: &Path) -> tokio::process::Command {
    let mut cmd = if is_root() {
        let mut cmd = tokio::process::Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        tokio::process::Command::new(program)
    };
    cmd.current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

/// Hands `dir` to the `postgres` user (which must exist, as for `make up`'s private cluster).
fn give_to_postgres(dir: &Path) {
    let status = std::process::Command::new("chown")
        .arg("postgres:")
        .arg(dir)
        .status()
        .expect("run chown");
    assert!(
        status.success(),
        "as root, the test's cluster needs a 'postgres' user (useradd --system postgres)"
    );
}

/// The directory of `initdb` and `pg_ctl`, found as `scripts/stack.sh` finds it.
fn pg_bin_dir() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).find(|d| d.join("initdb").is_file()));
    let mut installed: Vec<PathBuf> = ["/usr/lib/postgresql", "/usr"]
        .iter()
        .filter_map(|root| std::fs::read_dir(root).ok())
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.starts_with("/usr/lib/postgresql")
                || p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("pgsql-"))
        })
        .map(|p| p.join("bin"))
        .collect();
    // Newest first: by the version number in the directory's name.
    installed.sort_by_key(|p| std::cmp::Reverse(version_of(p)));
    from_path
        .into_iter()
        .chain(installed)
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
}

fn version_of(bin: &Path) -> u32 {
    bin.parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().trim_start_matches("pgsql-").to_owned())
        .and_then(|v| v.split('.').next().and_then(|m| m.parse().ok()))
        .unwrap_or(0)
}

/// A port nothing listens on now (the server takes it a moment later).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}
