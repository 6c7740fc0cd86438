//! rumqttc MQTT 5 clients whose events arrive on a channel.

use super::*;
pub use rumqttc::v5::mqttbytes::v5::Packet;
pub use rumqttc::v5::mqttbytes::QoS;
pub use rumqttc::v5::{AsyncClient, Event, MqttOptions};

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
                    let _ = tx.send(Err(format!("{e:?}")));
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

pub async fn connect(o: MqttOptions) -> Client {
    let mut c = connect_raw(o);
    assert!(
        c.wait_for(Duration::from_secs(5), |p| matches!(p, Packet::ConnAck(a) if a.code == rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success)).await,
        "no successful CONNACK"
    );
    c
}

impl Client {
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

    pub async fn next_publish(
        &mut self,
        timeout: Duration,
    ) -> Option<rumqttc::v5::mqttbytes::v5::Publish> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(Event::Incoming(Packet::Publish(p))))) => return Some(p),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }

    /// The next packet the server sent, whatever it is.
    pub async fn next_incoming(&mut self, timeout: Duration) -> Option<Result<Packet, String>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(Event::Incoming(p)))) => return Some(Ok(p)),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => return Some(Err(e)),
                _ => return None,
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
