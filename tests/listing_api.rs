//! The paged listings of the HTTP API over real HTTP (reqwest) with real MQTT clients
//! (rumqttc) on a 2-shard gateway (issue 22): `GET /v1/clients` (paging through more
//! clients than a page holds without duplicates or gaps while clients come and go, the
//! `online` filter, bounded scans), `GET /v1/retained` and `DELETE /v1/retained` (the
//! deleted message is not given to a new subscriber, also after a `kill -9`), and the
//! 400s naming the bad parameter.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{tempdir, v4, GatewayProcess, TestServer};
use gateway::mailbox::home_shard;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

async fn call(http: SocketAddr, method: reqwest::Method, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .request(method, format!("http://{http}{path}"))
        .send()
        .await
        .expect("request");
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

async fn get(http: SocketAddr, path: &str) -> (u16, Value) {
    call(http, reqwest::Method::GET, path).await
}

/// One page of `path` (a route with `?` and its parameters) from `cursor`: its `list`
/// entries and its `next_cursor`.
async fn next_page(
    http: SocketAddr,
    path: &str,
    list: &str,
    cursor: Option<&str>,
) -> (Vec<Value>, Option<String>) {
    let mut url = path.to_owned();
    if let Some(c) = cursor {
        url.push_str(&format!("&cursor={}", urlencode(c)));
    }
    let (code, page) = get(http, &url).await;
    assert_eq!(code, 200, "{url}: {page}");
    let items = page[list].as_array().expect("a list").clone();
    let next = page["next_cursor"].as_str().map(str::to_owned);
    (items, next)
}

/// Every page of `path`, following `next_cursor` until it is null.
async fn page_all(http: SocketAddr, path: &str, list: &str) -> Vec<Value> {
    let (mut all, mut cursor) = next_page(http, path, list, None).await;
    for n in 0.. {
        let Some(c) = cursor else { return all };
        assert!(n < 1000, "paging does not end");
        let (items, next) = next_page(http, path, list, Some(&c)).await;
        all.extend(items);
        cursor = next;
    }
    unreachable!()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn ids(items: &[Value], key: &str) -> Vec<String> {
    items
        .iter()
        .map(|i| i[key].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts `ids` is strictly increasing: no entry twice, in key order.
fn assert_sorted_once(ids: &[String]) {
    for w in ids.windows(2) {
        assert!(
            w[0] < w[1],
            "out of order or listed twice: {w:?} in {ids:?}"
        );
    }
}

async fn device(mqtt: SocketAddr, id: &str, persistent: bool) -> v4::Client {
    let mut o = v4::options(mqtt, id);
    o.set_clean_session(!persistent);
    v4::connect(o).await
}

#[tokio::test]
async fn clients_page_through_both_shards_without_duplicates_or_gaps() {
    // A shard looks at 3 ids per page at most: pages end early and must still join up.
    let gw = TestServer::start("[shards]\ncount = 2\n[http]\nlist_scan_max = 3");
    let mut kept = Vec::new();
    for i in 0..23 {
        kept.push(device(gw.mqtt, &format!("dev-{i:02}"), true).await);
    }
    let homes: BTreeSet<usize> = (0..23)
        .map(|i| home_shard(&format!("dev-{i:02}"), 2))
        .collect();
    assert_eq!(homes.len(), 2, "the devices live on both shards");
    // Clients that come and go while the pages are read.
    let (mut going, mut going_new) = (Vec::new(), Vec::new());
    for i in 0..4 {
        going.push(device(gw.mqtt, &format!("dev-{i:02}-gone"), false).await);
    }
    // Between pages one client goes and one comes, before and after the cursor.
    let (mut listed, mut cursor) = next_page(gw.http, "/v1/clients?limit=5", "clients", None).await;
    let mut n = 0;
    while let Some(c) = cursor {
        if let Some(c) = going.pop() {
            c.client.disconnect().await.unwrap();
        }
        going_new.push(device(gw.mqtt, &format!("dev-{n:02}-new"), false).await);
        n += 1;
        assert!(n < 100, "paging does not end");
        let (items, next) = next_page(gw.http, "/v1/clients?limit=5", "clients", Some(&c)).await;
        listed.extend(items);
        cursor = next;
    }
    assert!(n >= 5, "only {n} pages");
    let listed_ids = ids(&listed, "client_id");
    assert_sorted_once(&listed_ids);
    for i in 0..23 {
        let id = format!("dev-{i:02}");
        assert!(listed_ids.contains(&id), "{id} was skipped: {listed_ids:?}");
    }
    let first = listed.iter().find(|c| c["client_id"] == "dev-00").unwrap();
    assert_eq!(first["online"], true, "{first}");
    assert_eq!(first["shard"], home_shard("dev-00", 2), "{first}");
    assert_eq!(first["protocol_version"], 4, "{first}");
    drop(kept);
}

#[tokio::test]
async fn the_online_filter_lists_only_online_or_only_offline_sessions() {
    let gw = TestServer::start("[shards]\ncount = 2\n[http]\nlist_scan_max = 2");
    let mut online = Vec::new();
    for i in 0..6 {
        let c = device(gw.mqtt, &format!("dev-{i}"), true).await;
        if i % 2 == 0 {
            c.client.disconnect().await.unwrap();
        } else {
            online.push(c);
        }
    }
    let want_offline = ["dev-0", "dev-2", "dev-4"];
    let deadline = Instant::now() + T;
    loop {
        let offline = page_all(gw.http, "/v1/clients?online=false&limit=2", "clients").await;
        if ids(&offline, "client_id") == want_offline {
            assert!(offline.iter().all(|c| c["online"] == false));
            break;
        }
        assert!(Instant::now() < deadline, "offline sessions: {offline:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let on = page_all(gw.http, "/v1/clients?online=true", "clients").await;
    assert_eq!(ids(&on, "client_id"), ["dev-1", "dev-3", "dev-5"]);
    let all = page_all(gw.http, "/v1/clients?limit=4", "clients").await;
    assert_eq!(all.len(), 6);
}

#[tokio::test]
async fn bad_listing_parameters_are_400_naming_the_field() {
    let gw = TestServer::start("[shards]\ncount = 2\n[http]\nlist_max_limit = 50");
    for (path, field) in [
        ("/v1/clients?limit=0", "limit"),
        ("/v1/clients?limit=51", "limit"),
        ("/v1/clients?limit=ten", "limit"),
        ("/v1/clients?online=yes", "online"),
        ("/v1/clients?cursor=a&cursor=b", "cursor"),
        ("/v1/clients?page=2", "page"),
        ("/v1/retained?filter=a/%23/b", "filter"),
        ("/v1/retained?online=true", "online"),
        ("/v1/retained?limit=-1", "limit"),
    ] {
        let (code, b) = get(gw.http, path).await;
        assert_eq!(
            (code, b["error"]["field"].as_str()),
            (400, Some(field)),
            "{path}: {b}"
        );
    }
    for (path, field) in [
        ("/v1/retained", "topic"),
        ("/v1/retained?topic=a/%2B", "topic"),
        ("/v1/retained?topic=a&limit=1", "limit"),
    ] {
        let (code, b) = call(gw.http, reqwest::Method::DELETE, path).await;
        assert_eq!(
            (code, b["error"]["field"].as_str()),
            (400, Some(field)),
            "{path}: {b}"
        );
    }
    let (code, b) = get(gw.http, "/v1/clients?limit=50").await;
    assert_eq!(code, 200, "{b}");
    assert_eq!(b, json!({"clients": [], "next_cursor": null}));
}

#[tokio::test]
async fn listings_need_the_token_like_the_rest_of_v1() {
    let gw = TestServer::start("[shards]\ncount = 2\n[http]\ntokens = [\"t0k\"]");
    for path in ["/v1/clients", "/v1/retained"] {
        assert_eq!(get(gw.http, path).await.0, 401, "{path}");
        let r = reqwest::Client::new()
            .get(format!("http://{}{path}", gw.http))
            .bearer_auth("t0k")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
    let (code, _) = call(gw.http, reqwest::Method::DELETE, "/v1/retained?topic=a").await;
    assert_eq!(code, 401);
}

/// The retained messages a new subscriber to `cfg/#` gets, in order (until the marker
/// pushed after its SUBACK arrives).
async fn retained_for_new_subscriber(mqtt: SocketAddr, http: SocketAddr, id: &str) -> Vec<String> {
    let mut sub = device(mqtt, id, false).await;
    sub.subscribe("cfg/#", v4::QoS::AtLeastOnce).await;
    let (code, b) = common::post_json(
        http,
        "/v1/push",
        &json!({"topic": "cfg/~end", "payload": "end"}),
    )
    .await;
    assert_eq!(code, 200, "{b}");
    let mut got = Vec::new();
    loop {
        let p = sub.next_publish(T).await.expect("the end marker arrives");
        if p.topic == "cfg/~end" {
            return got;
        }
        assert!(p.retain, "{p:?}");
        got.push(p.topic.clone());
    }
}

fn store_toml(dir: &tempdir::Dir) -> String {
    format!(
        "[shards]\ncount = 2\n[http]\nlist_scan_max = 2\nlist_page_bytes = 20\n[store]\npath = \"{}\"\n",
        dir.0.join("data").display().to_string().replace('\\', "/")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_listed_and_deleted_for_good() {
    let dir = tempdir::Dir::new("retained-api");
    let extra = store_toml(&dir);
    let mut gw = GatewayProcess::start(&extra);
    let publisher = device(gw.mqtt, "publisher", false).await;
    let topics = ["cfg/a", "cfg/b", "cfg/c", "cfg/d", "cfg/e"];
    for t in topics {
        publisher
            .client
            .publish(t, v4::QoS::AtLeastOnce, true, format!("value of {t}"))
            .await
            .unwrap();
    }
    publisher
        .client
        .publish("cfg/bin", v4::QoS::AtMostOnce, true, vec![0xff, 0x00])
        .await
        .unwrap();
    let mut want: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    want.push("cfg/bin".into());
    want.sort();
    let deadline = Instant::now() + T;
    let listed = loop {
        let listed = page_all(gw.http, "/v1/retained?limit=2", "retained").await;
        if ids(&listed, "topic") == want {
            break listed;
        }
        assert!(Instant::now() < deadline, "retained: {listed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let a = &listed[0];
    assert_eq!(
        (
            a["topic"].as_str(),
            a["qos"].as_u64(),
            a["payload"].as_str(),
            a["encoding"].as_str(),
            a["payload_size"].as_u64()
        ),
        (
            Some("cfg/a"),
            Some(1),
            Some("value of cfg/a"),
            Some("utf8"),
            Some(14)
        ),
        "{a}"
    );
    let bin = listed.iter().find(|m| m["topic"] == "cfg/bin").unwrap();
    assert_eq!(
        (bin["payload"].as_str(), bin["encoding"].as_str()),
        (Some("/wA="), Some("base64")),
        "{bin}"
    );
    // A shard looks at 2 topics and puts 20 payload bytes on a page at most: a page of
    // 100 ends early, with a cursor.
    let (code, b) = get(gw.http, "/v1/retained?limit=100").await;
    let first = b["retained"].as_array().map_or(0, Vec::len);
    assert!(
        code == 200 && first < 6 && b["next_cursor"].is_string(),
        "{b}"
    );
    let listed = page_all(gw.http, "/v1/retained?filter=cfg/%2B&limit=100", "retained").await;
    assert_eq!(ids(&listed, "topic"), want);
    let listed = page_all(gw.http, "/v1/retained?filter=cfg/d", "retained").await;
    assert_eq!(ids(&listed, "topic"), ["cfg/d"]);

    let (code, b) = call(gw.http, reqwest::Method::DELETE, "/v1/retained?topic=cfg/c").await;
    assert_eq!(
        (code, &b),
        (200, &json!({"topic": "cfg/c", "deleted": true}))
    );
    let (code, b) = call(gw.http, reqwest::Method::DELETE, "/v1/retained?topic=cfg/c").await;
    assert_eq!(
        (code, b["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{b}"
    );
    want.retain(|t| t != "cfg/c");
    assert_eq!(
        retained_for_new_subscriber(gw.mqtt, gw.http, "fresh-1").await,
        want
    );

    // The delete was answered after the store committed it: a kill -9 does not undo it.
    gw.signal(libc::SIGKILL);
    assert!(gw.wait_exit(T).is_some(), "gateway did not die");
    let gw = GatewayProcess::start(&extra);
    assert_eq!(
        retained_for_new_subscriber(gw.mqtt, gw.http, "fresh-2").await,
        want
    );
    let listed = page_all(gw.http, "/v1/retained?limit=4", "retained").await;
    assert_eq!(ids(&listed, "topic"), want);
}
