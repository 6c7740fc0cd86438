use super::*;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn policy<'a>(origins: &'a [String]) -> Policy<'a> {
    Policy {
        path: "/mqtt",
        allowed_origins: origins,
        max_bytes: 1024,
    }
}

/// A valid browser-style request, with `edit` applied to its header lines.
fn request(first: &str, edit: impl Fn(&mut Vec<String>)) -> Vec<u8> {
    let mut lines: Vec<String> = [
        "Host: gw.example",
        "Upgrade: websocket",
        "Connection: keep-alive, Upgrade",
        "Sec-WebSocket-Version: 13",
        &format!("Sec-WebSocket-Key: {KEY}"),
        "Sec-WebSocket-Protocol: wamp, mqtt",
        "Origin: https://dash.example",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    edit(&mut lines);
    format!("{first}\r\n{}\r\n\r\n", lines.join("\r\n")).into_bytes()
}

fn without(name: &'static str) -> impl Fn(&mut Vec<String>) {
    move |l| {
        l.retain(|h| {
            !h.to_ascii_lowercase()
                .starts_with(&name.to_ascii_lowercase())
        })
    }
}

fn replacing(name: &'static str, line: &'static str) -> impl Fn(&mut Vec<String>) {
    move |l| {
        without(name)(l);
        l.push(line.to_string());
    }
}

#[test]
fn accept_key_matches_rfc_6455_example() {
    assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[test]
fn valid_upgrade_is_accepted_with_the_mqtt_subprotocol() {
    let req = request("GET /mqtt HTTP/1.1", |_| {});
    let Upgrade::Accepted(a) = parse(&req, &policy(&[])) else {
        panic!("refused");
    };
    assert_eq!(a.consumed, req.len());
    assert_eq!(a.protocol, "mqtt");
    let resp = String::from_utf8(a.response()).unwrap();
    assert!(resp.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
    assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    assert!(resp.contains("Sec-WebSocket-Protocol: mqtt\r\n"));
    assert!(resp.ends_with("\r\n\r\n"));
}

#[test]
fn accepted_cases() {
    let origins = vec!["https://dash.example".to_string()];
    let cases: Vec<(&str, Vec<u8>, &[String], &str)> = vec![
        (
            "mqttv3.1 offered",
            request(
                "GET /mqtt HTTP/1.1",
                replacing("sec-websocket-protocol", "Sec-WebSocket-Protocol: mqttv3.1"),
            ),
            &[],
            "mqttv3.1",
        ),
        (
            "protocol list over two header lines",
            request("GET /mqtt HTTP/1.1", |l| {
                l.push("Sec-WebSocket-Protocol: x,mqtt".into())
            }),
            &[],
            "mqtt",
        ),
        (
            "query string ignored",
            request("GET /mqtt?token=1 HTTP/1.1", |_| {}),
            &[],
            "mqtt",
        ),
        (
            "header names and tokens in any case",
            request("GET /mqtt HTTP/1.1", |l| {
                without("upgrade")(l);
                without("connection")(l);
                l.push("UPGRADE: WebSocket".into());
                l.push("connection: UPGRADE".into());
            }),
            &[],
            "mqtt",
        ),
        (
            "allowed origin",
            request("GET /mqtt HTTP/1.1", |_| {}),
            &origins,
            "mqtt",
        ),
        (
            "no Origin (not a browser) with an allow list",
            request("GET /mqtt HTTP/1.1", without("origin")),
            &origins,
            "mqtt",
        ),
    ];
    for (name, req, origins, protocol) in cases {
        match parse(&req, &policy(origins)) {
            Upgrade::Accepted(a) => assert_eq!(a.protocol, protocol, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn refused_cases_name_what_was_wrong() {
    let origins = vec!["https://other.example".to_string()];
    type Case<'a> = (&'a str, Vec<u8>, &'a [String], Refusal, u16);
    let cases: Vec<Case> = vec![
        (
            "POST",
            request("POST /mqtt HTTP/1.1", |_| {}),
            &[],
            Refusal::Method,
            405,
        ),
        (
            "other path",
            request("GET /ws HTTP/1.1", |_| {}),
            &[],
            Refusal::Path,
            404,
        ),
        (
            "path prefix",
            request("GET /mqtt/x HTTP/1.1", |_| {}),
            &[],
            Refusal::Path,
            404,
        ),
        (
            "no Upgrade",
            request("GET /mqtt HTTP/1.1", without("upgrade")),
            &[],
            Refusal::NotUpgrade,
            426,
        ),
        (
            "Upgrade: h2c",
            request("GET /mqtt HTTP/1.1", replacing("upgrade", "Upgrade: h2c")),
            &[],
            Refusal::NotUpgrade,
            426,
        ),
        (
            "Connection without upgrade",
            request(
                "GET /mqtt HTTP/1.1",
                replacing("connection", "Connection: keep-alive"),
            ),
            &[],
            Refusal::NotUpgrade,
            426,
        ),
        (
            "version 8",
            request(
                "GET /mqtt HTTP/1.1",
                replacing("sec-websocket-version", "Sec-WebSocket-Version: 8"),
            ),
            &[],
            Refusal::Version,
            426,
        ),
        (
            "no version",
            request("GET /mqtt HTTP/1.1", without("sec-websocket-version")),
            &[],
            Refusal::Version,
            426,
        ),
        (
            "no key",
            request("GET /mqtt HTTP/1.1", without("sec-websocket-key")),
            &[],
            Refusal::Key,
            400,
        ),
        (
            "short key",
            request(
                "GET /mqtt HTTP/1.1",
                replacing("sec-websocket-key", "Sec-WebSocket-Key: c2hvcnQ="),
            ),
            &[],
            Refusal::Key,
            400,
        ),
        (
            "two keys",
            request("GET /mqtt HTTP/1.1", |l| {
                l.push(format!("Sec-WebSocket-Key: {KEY}"))
            }),
            &[],
            Refusal::Key,
            400,
        ),
        (
            "origin not allowed",
            request("GET /mqtt HTTP/1.1", |_| {}),
            &origins,
            Refusal::Origin,
            403,
        ),
        (
            "no subprotocol",
            request("GET /mqtt HTTP/1.1", without("sec-websocket-protocol")),
            &[],
            Refusal::Subprotocol,
            400,
        ),
        (
            "only other subprotocols",
            request(
                "GET /mqtt HTTP/1.1",
                replacing(
                    "sec-websocket-protocol",
                    "Sec-WebSocket-Protocol: wamp, mqtt5x",
                ),
            ),
            &[],
            Refusal::Subprotocol,
            400,
        ),
        (
            "garbage",
            b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\r\n\r\n".to_vec(),
            &[],
            Refusal::Malformed,
            400,
        ),
        (
            "too many headers",
            request("GET /mqtt HTTP/1.1", |l| {
                l.extend((0..40).map(|i| format!("X-{i}: y")))
            }),
            &[],
            Refusal::TooLarge,
            431,
        ),
    ];
    for (name, req, origins, why, status) in cases {
        let mut p = policy(origins);
        p.max_bytes = 4096;
        assert_eq!(parse(&req, &p), Upgrade::Refused(why), "{name}");
        let resp = String::from_utf8(why.response()).unwrap();
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status} ")),
            "{name}: {resp}"
        );
        assert!(resp.contains("Connection: close\r\n"), "{name}");
        assert!(
            resp.ends_with(&format!("\r\n\r\n{why}\n")),
            "{name}: {resp}"
        );
    }
}

#[test]
fn responses_carry_the_headers_their_status_calls_for() {
    let version = String::from_utf8(Refusal::Version.response()).unwrap();
    assert!(version.contains("Sec-WebSocket-Version: 13\r\n"));
    let upgrade = String::from_utf8(Refusal::NotUpgrade.response()).unwrap();
    assert!(upgrade.contains("Upgrade: websocket\r\n"));
    let body = "Sec-WebSocket-Protocol must offer mqtt\n";
    let sub = String::from_utf8(Refusal::Subprotocol.response()).unwrap();
    assert!(sub.contains(&format!("Content-Length: {}\r\n", body.len())));
}

#[test]
fn every_prefix_of_a_valid_request_is_partial() {
    let req = request("GET /mqtt HTTP/1.1", |_| {});
    for n in 0..req.len() {
        assert_eq!(
            parse(&req[..n], &policy(&[])),
            Upgrade::Partial,
            "prefix {n}"
        );
    }
}

#[test]
fn bytes_after_the_request_are_left_for_the_frame_decoder() {
    let mut req = request("GET /mqtt HTTP/1.1", |_| {});
    let n = req.len();
    req.extend_from_slice(&[0x82, 0x80, 1, 2, 3, 4]);
    let Upgrade::Accepted(a) = parse(&req, &policy(&[])) else {
        panic!("refused");
    };
    assert_eq!(a.consumed, n);
}

#[test]
fn size_bound_refuses_a_request_that_does_not_end() {
    // A slowloris: a header line that keeps growing never completes the request.
    let mut req = b"GET /mqtt HTTP/1.1\r\nX-Pad: ".to_vec();
    req.resize(1023, b'a');
    assert_eq!(parse(&req, &policy(&[])), Upgrade::Partial);
    req.push(b'a');
    assert_eq!(
        parse(&req, &policy(&[])),
        Upgrade::Refused(Refusal::TooLarge)
    );
    // A complete request over the bound is refused too.
    let mut p = policy(&[]);
    let full = request("GET /mqtt HTTP/1.1", |_| {});
    p.max_bytes = full.len() - 1;
    assert_eq!(parse(&full, &p), Upgrade::Refused(Refusal::TooLarge));
}
