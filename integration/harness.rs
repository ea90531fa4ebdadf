//! Starting and stopping the real binaries, and a scratch database per test.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ROUTER_BIN: &str = env!("CARGO_BIN_EXE_koukan-router");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running server process; killed when dropped.
pub struct Process {
    pub child: Child,
    pub name: String,
    log: PathBuf,
}

impl Process {
    /// Starts `bin config` and waits until `port` accepts connections.
    pub fn start(bin: &str, config: &Path, port: u16, log_dir: &Path, name: &str) -> Process {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let mut p = Process {
            child,
            name: name.to_string(),
            log,
        };
        p.wait_for_port(port);
        p
    }

    fn wait_for_port(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited with {status}:\n{}", self.name, self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{} did not listen on {port}:\n{}", self.name, self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!("{} ignored SIGTERM:\n{}", self.name, self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Log lines, for assertions on what the process reported.
    pub fn log_lines(&self) -> Vec<String> {
        match std::fs::File::open(&self.log) {
            Ok(f) => BufReader::new(f).lines().map_while(Result::ok).collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// A router YAML with one REST sender (`submission`, retries and DSNs) and one incremental
/// sender (`smtp`), on `port`, storing in `storage_url`.
pub fn router_config(port: u16, storage_url: &str) -> String {
    format!(
        r#"global:
  mailer_daemon_mailbox: mailer-daemon@example.com
rest_listener:
  addr: ["127.0.0.1", {port}]
  session_uri: http://127.0.0.1:{port}
sender:
- name: submission
  output_chain: submission
  retry: output_chain
  notification: output_chain
  tag:
  - name: dsn
    notification: null
  - name: relay
    retry: null
    notification: null
- name: smtp
  output_chain: smtp
  upstream_sender: submission
  upstream_tag: relay
endpoint:
- name: submission
  output_handler:
    downstream_timeout: 60
    retry_params: {{}}
    notification:
      sender: submission
      tag: dsn
  chain:
  - filter: rest_output
    static_endpoint: http://127.0.0.1:9/senders/x/transactions
- name: smtp
  chain:
  - filter: exploder
storage:
  url: {storage_url}
  session_refresh_interval: 1
"#
    )
}

/// A PostgreSQL database created for one test and dropped afterwards. `None` (with a
/// message) when `KOUKAN_TEST_POSTGRES` is unset; a panic when it is set but unusable.
pub struct PgDatabase {
    server: String,
    pub name: String,
}

impl PgDatabase {
    pub fn create() -> Option<PgDatabase> {
        let Ok(server) = std::env::var("KOUKAN_TEST_POSTGRES") else {
            eprintln!("skipping Postgres test: KOUKAN_TEST_POSTGRES not set");
            return None;
        };
        let name = format!(
            "koukan_it_{}",
            koukan::rest_id::new_rest_id(6)
                .to_lowercase()
                .replace('-', "_")
        );
        psql(&server, &format!("CREATE DATABASE {name}"));
        Some(PgDatabase { server, name })
    }

    /// A URL for the router config.
    pub fn url(&self) -> String {
        format!("{}/{}", self.server.trim_end_matches('/'), self.name)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        psql(
            &self.server,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn psql(server: &str, sql: &str) {
    let url = format!("{}/postgres", server.trim_end_matches('/'));
    let out = Command::new("psql")
        .args([&url, "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("running psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until `port` accepts connections too (a process with several listeners).
pub fn wait_for_port(p: &mut Process, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("{} exited with {status}:\n{}", p.name, p.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} did not listen on {port}:\n{}", p.name, p.log());
}
