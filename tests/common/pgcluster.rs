//! A private, throwaway PostgreSQL cluster that a test may really stop and start again, unlike the
//! server on 127.0.0.1:5432 that every other test shares. Owns: creating it (`initdb`, trust auth,
//! a free port on 127.0.0.1, its unix socket inside its data directory), stopping it the way a
//! crash looks to clients (`pg_ctl stop -m immediate`), starting it again on the same port, and
//! removing it. When it cannot be created the test fails and says why; it never skips.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

/// How long `pg_ctl start` (including crash recovery after an immediate stop) may take.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct PgCluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    /// PostgreSQL refuses to run as root: then every server binary runs as this user.
    run_as: Option<&'static str>,
    running: bool,
}

impl PgCluster {
    /// Creates the cluster in a new directory under the temp dir and starts it.
    pub fn start() -> PgCluster {
        let bin = bin_dir();
        let run_as = (effective_uid() == 0).then_some("postgres");
        let data = std::env::temp_dir().join(format!(
            "dingsync-pgcluster-{}-{}",
            std::process::id(),
            dingsync::crypto::random_nonce(8).to_lowercase()
        ));
        std::fs::create_dir(&data)
            .unwrap_or_else(|e| panic!("PgCluster: creating {}: {e}", data.display()));
        let mut cluster = PgCluster {
            bin,
            data,
            port: super::free_port(),
            run_as,
            running: false,
        };
        if let Some(user) = run_as {
            let chowned = Command::new("chown")
                .arg(format!("{user}:"))
                .arg(&cluster.data)
                .output();
            check("chown of the data directory", chowned);
        }
        let data = cluster.data.display().to_string();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                // A throwaway cluster: initdb's own fsyncs only cost time. The server keeps fsync.
                "--no-sync",
            ],
        );
        // In postgresql.conf rather than on pg_ctl's command line, so that a restart reuses them.
        let settings = format!(
            "\n# dingsync test cluster\nlisten_addresses = '127.0.0.1'\nport = {}\n\
             unix_socket_directories = '{data}'\nshared_buffers = 32MB\n",
            cluster.port
        );
        let conf = cluster.data.join("postgresql.conf");
        let appended = std::fs::read_to_string(&conf)
            .map(|text| text + &settings)
            .and_then(|text| std::fs::write(&conf, text));
        if let Err(e) = appended {
            panic!("PgCluster: writing {}: {e}", conf.display());
        }
        cluster.restart();
        cluster
    }

    /// A URL of database `dingsync` on this cluster (the daemon creates it at start-up).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/dingsync", self.port)
    }

    /// Stops the server at once, without a checkpoint, and cuts every connection: to clients
    /// this is a server that crashed or was switched off.
    pub fn stop(&mut self) {
        let data = self.data.display().to_string();
        self.run("pg_ctl", &["stop", "-D", &data, "-m", "immediate", "-w"]);
        self.running = false;
    }

    /// Starts the server (again) on the same port and returns once it accepts connections.
    pub fn restart(&mut self) {
        let data = self.data.display().to_string();
        let log = self.data.join("server.log").display().to_string();
        let timeout = START_TIMEOUT.as_secs().to_string();
        self.run(
            "pg_ctl",
            &["start", "-D", &data, "-l", &log, "-w", "-t", &timeout],
        );
        self.running = true;
        // pg_ctl -w already waited; pg_isready confirms that TCP clients get in too.
        let port = self.port.to_string();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
                .output();
            if ready.as_ref().is_ok_and(|o| o.status.success()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PgCluster: not ready within {START_TIMEOUT:?} (see {log}): {ready:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `name` from the server's bin directory, as the user the server runs as.
    fn command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut command = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        // The test's working directory may be closed to the server's user.
        command.current_dir(&self.data);
        command
    }

    fn run(&self, name: &str, args: &[&str]) {
        let output = self.command(name).args(args).output();
        check(&format!("{name} {}", args.join(" ")), output);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let data = self.data.display().to_string();
            let _ = self
                .command("pg_ctl")
                .args(["stop", "-D", &data, "-m", "immediate", "-w"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// The newest installed PostgreSQL's bin directory (Debian layout), else `pg_config --bindir`.
fn bin_dir() -> PathBuf {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max();
    if let Some((_, bin)) = newest {
        return bin;
    }
    let output = Command::new("pg_config").arg("--bindir").output();
    let bin =
        PathBuf::from(String::from_utf8_lossy(&check("pg_config --bindir", output).stdout).trim());
    assert!(
        bin.join("initdb").exists(),
        "PgCluster: no initdb in /usr/lib/postgresql/<version>/bin nor in {} (pg_config --bindir): install the PostgreSQL server",
        bin.display()
    );
    bin
}

/// The effective uid, as `id -u` prints it (std has no portable getter).
fn effective_uid() -> u32 {
    let output = check("id -u", Command::new("id").arg("-u").output());
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("PgCluster: `id -u` printed {text:?}: {e}"))
}

fn check(what: &str, output: std::io::Result<Output>) -> Output {
    let output = output.unwrap_or_else(|e| panic!("PgCluster: {what}: cannot run it: {e}"));
    assert!(
        output.status.success(),
        "PgCluster: {what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
