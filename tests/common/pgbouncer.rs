//! A private PgBouncer in transaction pooling mode in front of the shared PostgreSQL
//! (127.0.0.1:5432, trust auth), for tests that run dingsync behind a pooler. Owns: writing its
//! ini and user list into a new temp directory, starting it on a free port, waiting until it
//! answers, the URL of a database through it, and stopping it (on drop). Every database of the
//! server is reachable through it (`* = ...`), so a test's `TestDb` works as is. When the binary
//! is missing or does not start, the test fails and says why; it never skips.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// How long PgBouncer may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct PgBouncer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl PgBouncer {
    /// Starts a PgBouncer with `pool_mode = transaction` and `pool_size` server connections per
    /// database and user.
    pub fn start(pool_size: u32) -> PgBouncer {
        let bin = binary();
        let dir = std::env::temp_dir().join(format!(
            "dingsync-pgbouncer-{}-{}",
            std::process::id(),
            dingsync::crypto::random_nonce(8).to_lowercase()
        ));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("PgBouncer: creating {}: {e}", dir.display()));
        let port = super::free_port();
        let users = dir.join("userlist.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n").unwrap();
        let ini = dir.join("pgbouncer.ini");
        // No unix socket, logs on stderr (kept by the test's output on failure), stats quiet.
        std::fs::write(
            &ini,
            format!(
                "[databases]
* = host=127.0.0.1 port=5432

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {users}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 1000
max_db_connections = 0
server_reset_query =
log_connections = 0
log_disconnections = 0
stats_period = 3600
; a test's database may be asked for before it exists: retry soon after.
server_login_retry = 1
",
                users = users.display()
            ),
        )
        .unwrap();
        let mut command = Command::new(&bin);
        // PgBouncer refuses to run as root; `-u` makes it switch to the server's own user.
        if is_root() {
            command.args(["-u", "postgres"]);
        }
        let child = command
            .arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("PgBouncer: starting {}: {e}", bin.display()));
        let mut bouncer = PgBouncer { child, dir, port };
        bouncer.wait_until_accepting();
        bouncer
    }

    /// The URL of database `name` through this PgBouncer.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn wait_until_accepting(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("PgBouncer exited at start-up ({status}); its log is above");
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PgBouncer did not accept connections on port {} within {START_TIMEOUT:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `pgbouncer` on PATH or in /usr/sbin (Debian's package puts it there; `.ci/run` installs it).
fn binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("pgbouncer"))
        .find(|candidate| candidate.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "pgbouncer is not installed (not on PATH nor in /usr/sbin): install it with \
             `apt-get install -y pgbouncer` (.ci/run does); these tests never skip"
        )
    })
}

fn is_root() -> bool {
    let output = Command::new("id")
        .arg("-u")
        .output()
        .unwrap_or_else(|e| panic!("PgBouncer: running `id -u`: {e}"));
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}
