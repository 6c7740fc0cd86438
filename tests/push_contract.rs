//! The HTTP contract's corners (issue 17.13): fields that refuse null, NUL and over-long
//! topics, client routes that answer bad queries in JSON, and push metrics that count
//! requests and messages apart.

mod common;

use std::time::Duration;

use common::api::Api;
use common::{Raw, TestServer};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn push_fields_refuse_null_nul_and_over_long_topics() {
    let gw = TestServer::start("[mqtt]\nmax_topic_len = 32\n");
    let api = Api::new(&gw);
    for (body, field) in [
        (
            json!({"topic": "t", "payload": "x", "ttl_secs": null}),
            "ttl_secs",
        ),
        (json!({"topic": "t", "payload": "x", "qos": null}), "qos"),
        (
            json!({"client_id": "a\u{0}b", "topic": "t", "payload": "x"}),
            "client_id",
        ),
        (json!({"topic": "t".repeat(33), "payload": "x"}), "topic"),
        (
            json!({"messages": [{"topic": "t".repeat(33), "payload": "x"}]}),
            "messages[0].topic",
        ),
    ] {
        let (code, b) = if body.get("messages").is_some() {
            let (_, b) = api.post("/v1/push/batch", body).await;
            (
                b["results"][0]["error"]["status"].as_u64().unwrap_or(0) as u16,
                b["results"][0].clone(),
            )
        } else {
            api.push(body).await
        };
        assert_eq!(
            (code, b["error"]["field"].as_str()),
            (400, Some(field)),
            "{b}"
        );
    }
    let (code, b) = api
        .push(json!({"topic": "t".repeat(32), "payload": "x"}))
        .await;
    assert_eq!(code, 200, "{b}");
}

#[tokio::test]
async fn client_routes_answer_bad_queries_in_json_and_take_the_id_as_a_query_parameter() {
    let gw = TestServer::start("[mqtt]\nmax_client_id_len = 65535\n");
    let api = Api::new(&gw);
    let (code, b) = api
        .get("/v1/clients/x?clear_session=true&clear_session=false")
        .await;
    assert_eq!(
        (code, b["error"]["field"].as_str()),
        (400, Some("clear_session")),
        "{b}"
    );
    let (code, b) = api
        .delete("/v1/clients/x?clear_session=true&clear_session=true")
        .await;
    assert_eq!(code, 400, "{b}");
    assert_eq!(b["error"]["field"], "clear_session");
    let (code, b) = api.get("/v1/clients?client_id=a&client_id=b").await;
    assert_eq!(
        (code, b["error"]["field"].as_str()),
        (400, Some("client_id")),
        "{b}"
    );
    // Without a client id it is the paged list of clients (issue 22).
    assert_eq!(api.get("/v1/clients").await.0, 200);

    // The id as a query parameter (a device with a `/` in its id, say).
    let (code, b) = api.get("/v1/clients?client_id=a%2Fb").await;
    assert_eq!(
        (code, b["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{b}"
    );

    // A 65,535-byte id does not fit an HTTP/1 URI (414): it goes in a JSON body.
    let long = "d".repeat(65_535);
    let mut raw = Raw::connect(gw.mqtt).await;
    raw.send(&Raw::connect_v4(&long, 60, true)).await;
    assert!(matches!(
        raw.recv_v4(T).await,
        Ok(mqttbytes::v4::Packet::ConnAck(_))
    ));
    let r = api
        .req(reqwest::Method::GET, "/v1/clients")
        .json(&json!({"client_id": long}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let info: Value = r.json().await.unwrap();
    assert_eq!(info["online"], true);
    let r = api
        .req(reqwest::Method::DELETE, "/v1/clients")
        .json(&json!({"client_id": long, "clear_session": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(
        (&b["disconnected"], &b["session_cleared"]),
        (&json!(true), &json!(true))
    );
    assert!(raw.closed_within(T).await, "kicked");
    assert_eq!(api.get("/v1/clients?client_id=nobody").await.0, 404);
}

/// `gateway_push_requests_total` counts HTTP requests, `gateway_push_messages_total`
/// the messages in them (issue 16.12: a batch of 3 was counted as 3 requests).
#[tokio::test]
async fn push_metrics_count_requests_and_messages_apart() {
    let gw = TestServer::start("");
    let api = Api::new(&gw);
    let item = json!({"topic": "m/t", "payload": "x"});
    let (code, _) = api
        .post("/v1/push/batch", json!({"messages": [item, item, item]}))
        .await;
    assert_eq!(code, 200);
    let (code, _) = api.push(json!({"topic": "m/t"})).await;
    assert_eq!(code, 400);
    let metric = |s: &'static str| gw.metric(s);
    assert_eq!(
        metric("gateway_push_requests_total{endpoint=\"batch\",code=\"200\"}").await,
        1.0
    );
    assert_eq!(
        metric("gateway_push_requests_total{endpoint=\"push\",code=\"400\"}").await,
        1.0
    );
    assert_eq!(
        metric("gateway_push_messages_total{status=\"matched\"}").await,
        3.0
    );
    assert_eq!(
        metric("gateway_push_messages_total{status=\"bad_request\"}").await,
        1.0
    );
}
