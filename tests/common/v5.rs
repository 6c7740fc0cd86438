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

/// MQTT 5 device `id` on `addr` whose session lasts `expiry` seconds offline and whose
/// will (on `will/<id>`, payload `id`, QoS 1) waits `delay` seconds.
pub async fn connect_with_will(addr: SocketAddr, id: &str, delay: u32, expiry: u32) -> Client {
    use rumqttc::v5::mqttbytes::v5::{ConnectProperties, LastWill, LastWillProperties};
    let mut o = options(addr, id);
    o.set_clean_start(expiry == 0);
    let mut props = ConnectProperties::new();
    props.session_expiry_interval = Some(expiry);
    o.set_connect_properties(props);
    let will_props = LastWillProperties {
        delay_interval: Some(delay),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    let will = LastWill::new(
        format!("will/{id}"),
        id,
        QoS::AtLeastOnce,
        false,
        Some(will_props),
    );
    o.set_last_will(will);
    connect(o).await
}
