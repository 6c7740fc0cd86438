//! rumqttc v3.1.1 clients whose events arrive on a channel.

use super::*;
pub use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};

pub struct Client {
    pub client: AsyncClient,
    pub events: mpsc::UnboundedReceiver<Result<Event, String>>,
    pub task: tokio::task::JoinHandle<()>,
}

pub fn options(addr: SocketAddr, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// Connects and waits for CONNACK; panics if it does not come.
pub async fn connect(o: MqttOptions) -> Client {
    let c = connect_raw(o);
    super::expect_connack_v4(c).await
}

/// Starts the event loop without waiting for anything.
pub fn connect_raw(o: MqttOptions) -> Client {
    let (client, mut el) = AsyncClient::new(o, 1000);
    let (tx, events) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(ev) => {
                    if tx.send(Ok(ev)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
        }
    });
    Client {
        client,
        events,
        task,
    }
}

impl Client {
    /// Next incoming PUBLISH within `timeout`.
    pub async fn next_publish(&mut self, timeout: Duration) -> Option<rumqttc::Publish> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(Event::Incoming(Packet::Publish(p))))) => return Some(p),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }

    /// Waits for an incoming packet matching `f`.
    pub async fn wait_for(&mut self, timeout: Duration, f: impl Fn(&Packet) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(Event::Incoming(p)))) if f(&p) => return true,
                Ok(Some(Ok(_))) => continue,
                _ => return false,
            }
        }
    }

    /// Waits until the event loop reports the connection failed.
    pub async fn wait_closed(&mut self, timeout: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Err(e))) => return Some(e),
                Ok(Some(Ok(_))) => continue,
                Ok(None) => return Some("event loop ended".into()),
                Err(_) => return None,
            }
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("subscribe request");
        assert!(
            self.wait_for(Duration::from_secs(5), |p| matches!(p, Packet::SubAck(_)))
                .await,
            "no SUBACK for {filter}"
        );
    }
}
