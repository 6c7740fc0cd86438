//! A raw MQTT client for byte-level tests: writes exactly what the test says, decodes what
//! the server sends with mqttbytes.

use super::*;

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw::from_stream(TcpStream::connect(addr).await.expect("tcp connect"))
    }

    pub fn from_stream(stream: TcpStream) -> Raw {
        Raw {
            stream,
            buf: BytesMut::with_capacity(4096),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// CONNECT bytes for MQTT 3.1.1.
    pub fn connect_v4(id: &str, keep_alive: u16, clean: bool) -> Vec<u8> {
        let mut c = mqttbytes::v4::Connect::new(id);
        c.keep_alive = keep_alive;
        c.clean_session = clean;
        let mut b = BytesMut::new();
        c.write(&mut b).unwrap();
        b.to_vec()
    }

    /// CONNECT bytes for MQTT 5.
    pub fn connect_v5(
        id: &str,
        keep_alive: u16,
        props: Option<mqttbytes::v5::ConnectProperties>,
    ) -> Vec<u8> {
        let mut c = mqttbytes::v5::Connect::new(id);
        c.keep_alive = keep_alive;
        c.properties = props;
        let mut b = BytesMut::new();
        c.write(&mut b).unwrap();
        b.to_vec()
    }

    pub fn publish_v4(topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
        let mut p =
            mqttbytes::v4::Publish::new(topic, mqttbytes::qos(qos).unwrap(), payload.to_vec());
        p.pkid = pkid;
        let mut b = BytesMut::new();
        p.write(&mut b).unwrap();
        b.to_vec()
    }

    pub fn subscribe_v4(filter: &str, qos: u8, pkid: u16) -> Vec<u8> {
        let mut s = mqttbytes::v4::Subscribe::new(filter, mqttbytes::qos(qos).unwrap());
        s.pkid = pkid;
        let mut b = BytesMut::new();
        s.write(&mut b).unwrap();
        b.to_vec()
    }

    /// Reads more into the buffer (straight into it: a 64 KiB array here would sit in every
    /// future awaiting a packet and overflow a test thread's stack in deep test helpers).
    async fn fill(&mut self, deadline: tokio::time::Instant) -> Result<(), &'static str> {
        self.buf.reserve(65536);
        match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(0)) => Err("closed"),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err("closed"),
            Err(_) => Err("timeout"),
        }
    }

    /// Next MQTT 3.1.1 packet from the server, or Err("closed"/"timeout").
    pub async fn recv_v4(
        &mut self,
        timeout: Duration,
    ) -> Result<mqttbytes::v4::Packet, &'static str> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match mqttbytes::v4::read(&mut self.buf, 1 << 28) {
                Ok(p) => return Ok(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => self.fill(deadline).await?,
                Err(_) => return Err("undecodable"),
            }
        }
    }

    /// Next MQTT 5 packet from the server, or Err("closed"/"timeout").
    pub async fn recv_v5(
        &mut self,
        timeout: Duration,
    ) -> Result<mqttbytes::v5::Packet, &'static str> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match mqttbytes::v5::read(&mut self.buf, 1 << 28) {
                Ok(p) => return Ok(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => self.fill(deadline).await?,
                Err(_) => return Err("undecodable"),
            }
        }
    }

    /// True if the server closes the connection within `timeout` (any bytes are skipped).
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.fill(deadline).await {
                Ok(()) => continue,
                Err("closed") => return true,
                Err(_) => return false,
            }
        }
    }
}

impl Raw {
    /// [`Raw::recv_v5`] behind a box. `recv_v5` keeps a 64 KiB read buffer in its future,
    /// and a debug build gives every awaited future of an async fn its own stack slot, so a
    /// test awaiting it a dozen times overflows the 2 MiB test thread stack; these
    /// wrappers keep the caller's future a pointer wide.
    pub async fn next_v5(
        &mut self,
        timeout: Duration,
    ) -> Result<mqttbytes::v5::Packet, &'static str> {
        Box::pin(self.recv_v5(timeout)).await
    }

    /// [`Raw::recv_v4`] behind a box (see [`Raw::next_v5`]).
    pub async fn next_v4(
        &mut self,
        timeout: Duration,
    ) -> Result<mqttbytes::v4::Packet, &'static str> {
        Box::pin(self.recv_v4(timeout)).await
    }

    /// [`Raw::closed_within`] behind a box (see [`Raw::next_v5`]).
    pub async fn wait_closed(&mut self, timeout: Duration) -> bool {
        Box::pin(self.closed_within(timeout)).await
    }

    /// Sends `connect` and returns the server's first packet, which must be a CONNACK.
    pub async fn handshake_v5(
        &mut self,
        connect: &mqttbytes::v5::Connect,
    ) -> mqttbytes::v5::ConnAck {
        self.send(&encode(|b| connect.write(b))).await;
        match self.next_v5(Duration::from_secs(5)).await {
            Ok(mqttbytes::v5::Packet::ConnAck(a)) => a,
            other => panic!("expected CONNACK for {}, got {other:?}", connect.client_id),
        }
    }

    /// Connects a raw MQTT 5 client and panics unless the CONNACK is a success.
    pub async fn connected_v5(
        addr: SocketAddr,
        connect: &mqttbytes::v5::Connect,
    ) -> (Raw, mqttbytes::v5::ConnAck) {
        let mut raw = Raw::connect(addr).await;
        let ack = raw.handshake_v5(connect).await;
        assert_eq!(
            ack.code,
            mqttbytes::v5::ConnectReturnCode::Success,
            "CONNACK for {}",
            connect.client_id
        );
        (raw, ack)
    }

    /// Connects a raw MQTT 3.1.1 client as `id` (keep-alive 60, `clean` session) and
    /// panics unless the first packet back is a successful CONNACK; gives its
    /// session-present flag.
    pub async fn connected_v4(addr: SocketAddr, id: &str, clean: bool) -> (Raw, bool) {
        let mut raw = Raw::connect(addr).await;
        raw.send(&Raw::connect_v4(id, 60, clean)).await;
        match raw.next_v4(Duration::from_secs(30)).await {
            Ok(mqttbytes::v4::Packet::ConnAck(a)) => {
                assert_eq!(a.code, mqttbytes::v4::ConnectReturnCode::Success, "{id}");
                (raw, a.session_present)
            }
            other => panic!("CONNACK for {id}: {other:?}"),
        }
    }

    /// Sends a SUBSCRIBE and returns its SUBACK (PUBLISHes that come first are an error).
    pub async fn subscribe_v5(
        &mut self,
        pkid: u16,
        filters: Vec<mqttbytes::v5::SubscribeFilter>,
    ) -> mqttbytes::v5::SubAck {
        let mut s = mqttbytes::v5::Subscribe::new_many(filters);
        s.pkid = pkid;
        self.send(&encode(|b| s.write(b))).await;
        match self.next_v5(Duration::from_secs(5)).await {
            Ok(mqttbytes::v5::Packet::SubAck(a)) => a,
            other => panic!("expected SUBACK {pkid}, got {other:?}"),
        }
    }

    /// Next MQTT 5 PUBLISH within `timeout`, acknowledging QoS 1 with PUBACK and QoS 2
    /// with PUBREC (the PUBREL is answered by PUBCOMP). Other packets are skipped; `None`
    /// on timeout or close.
    pub async fn next_publish_v5(&mut self, timeout: Duration) -> Option<mqttbytes::v5::Publish> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_v5(left).await {
                Ok(mqttbytes::v5::Packet::Publish(p)) => {
                    match p.qos {
                        mqttbytes::QoS::AtMostOnce => {}
                        mqttbytes::QoS::AtLeastOnce => {
                            let ack = mqttbytes::v5::PubAck::new(p.pkid);
                            self.send(&encode(|b| ack.write(b))).await;
                        }
                        mqttbytes::QoS::ExactlyOnce => {
                            let rec = mqttbytes::v5::PubRec::new(p.pkid);
                            self.send(&encode(|b| rec.write(b))).await;
                        }
                    }
                    return Some(p);
                }
                Ok(mqttbytes::v5::Packet::PubRel(r)) => {
                    let comp = mqttbytes::v5::PubComp::new(r.pkid);
                    self.send(&encode(|b| comp.write(b))).await;
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Next MQTT 5 packet; a DISCONNECT's reason code as a number (mqttbytes' enum
    /// `as u8`), for assertions on the exact code.
    pub async fn expect_disconnect_v5(&mut self, timeout: Duration) -> u8 {
        match self.next_v5(timeout).await {
            Ok(mqttbytes::v5::Packet::Disconnect(d)) => d.reason_code as u8,
            other => panic!("expected DISCONNECT, got {other:?}"),
        }
    }

    /// PINGREQ, then waits for PINGRESP (skipping anything else); false on close/timeout.
    pub async fn ping_v5(&mut self, timeout: Duration) -> bool {
        self.send(&[0xc0, 0x00]).await;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_v5(left).await {
                Ok(mqttbytes::v5::Packet::PingResp) => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    }
}
