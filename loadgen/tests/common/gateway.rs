//! A real gateway inside the test process for loadgen to run against (ephemeral ports,
//! two shards, its own store directory), and its `/metrics` read back.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use gateway::config::Config;
use gateway::server::Server;

const BASE: &str = r#"
[mqtt]
listen = "127.0.0.1:0"
[http]
listen = "127.0.0.1:0"
[shards]
count = 2
[log]
level = "warn"
# The fan-out and publish tests use shared topics the default ACL would deny.
[acl]
enabled = false
"#;

pub struct Gateway {
    server: Option<Server>,
    pub mqtt: SocketAddr,
    /// The TLS listener, when the config sets `mqtt.tls_listen`.
    pub tls: Option<SocketAddr>,
    pub http: SocketAddr,
    /// The gateway's own durable store directory, removed after it stops.
    store: std::path::PathBuf,
}

impl Gateway {
    pub fn start() -> Gateway {
        Gateway::start_with("", "")
    }

    /// A gateway with `mqtt_keys` added to the base config's `[mqtt]` section and
    /// `sections` (whole sections not in the base) appended.
    pub fn start_with(mqtt_keys: &str, sections: &str) -> Gateway {
        let store = std::env::temp_dir().join(format!(
            "loadgen-test-store-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let base = BASE.replacen("[mqtt]\n", &format!("[mqtt]\n{mqtt_keys}\n"), 1);
        let toml = format!(
            "{base}\n[store]\npath = \"{}\"\n{sections}\n",
            store.display()
        );
        let config = Config::from_toml_str(&toml).expect("valid test config");
        let server = Server::start(config, None).expect("gateway starts");
        Gateway {
            mqtt: server.mqtt_addr,
            tls: server.tls_addr,
            http: server.http_addr,
            server: Some(server),
            store,
        }
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.http)
    }

    /// One series from `/metrics` (`name{label="v"}`), or for a bare name the sum over
    /// its label sets.
    pub fn metric(&self, name: &str) -> f64 {
        let mut s = TcpStream::connect(self.http).expect("metrics connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).expect("metrics read");
        let mut sum = None;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((series, v)) = line.rsplit_once(' ') {
                let hit = if name.contains('{') {
                    series == name
                } else {
                    series.split('{').next() == Some(name)
                };
                if hit {
                    *sum.get_or_insert(0.0) += v.parse::<f64>().unwrap();
                }
            }
        }
        sum.unwrap_or_else(|| panic!("metric {name} not exported"))
    }

    /// Polls a metric until it equals `want` or `timeout` passes; returns the last value.
    pub fn wait_metric(&self, name: &str, want: f64, timeout: Duration) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric(name);
            if v == want || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = std::thread::spawn(move || s.shutdown()).join();
        }
        let _ = std::fs::remove_dir_all(&self.store);
    }
}
