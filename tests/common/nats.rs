//! A real `nats-server` with JetStream for the tests that need one (Debian's
//! `nats-server` package; `.ci/run` installs it): on a free loopback port with a store in
//! a temp directory, killed by its PID on drop.

use std::time::Duration;

/// A `nats-server` with JetStream on a free port, killed (by its PID) on drop.
pub struct NatsServer {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
    /// More command-line options (TLS, tests/fleet_tls.rs).
    args: Vec<String>,
}

impl NatsServer {
    pub fn start(tag: &str) -> NatsServer {
        NatsServer::start_on(tag, free_port())
    }

    pub fn start_on(tag: &str, port: u16) -> NatsServer {
        NatsServer::start_with(tag, port, Vec::new())
    }

    /// A server on `port` with more command-line options `args` (e.g. `--tls ...`).
    pub fn start_with(tag: &str, port: u16, args: Vec<String>) -> NatsServer {
        let dir = std::env::temp_dir().join(format!("nats-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let child = spawn_nats(port, &dir, &args);
        NatsServer {
            child,
            port,
            dir,
            args,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL, by its PID); its store directory stays.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the server where it is (SIGSTOP): its connections stay open and every
    /// request waits, as on a server that hangs.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the PID of our own child, which has not been waited for.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Starts the killed server again on the same port and store directory.
    pub fn respawn(&mut self) {
        self.child = spawn_nats(self.port, &self.dir, &self.args);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A client, once the server accepts connections.
    pub async fn client(&self) -> async_nats::Client {
        let end = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match async_nats::connect(self.url()).await {
                Ok(c) => return c,
                Err(e) => assert!(tokio::time::Instant::now() < end, "nats-server: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn_nats(port: u16, dir: &std::path::Path, args: &[String]) -> std::process::Child {
    std::process::Command::new(nats_server_binary())
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nats-server runs (apt install nats-server)")
}

/// A loopback port nothing listens on (until someone binds it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn nats_server_binary() -> String {
    for path in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if std::path::Path::new(path).exists() {
            return path.into();
        }
    }
    "nats-server".into()
}
