//! Authentication providers end to end: a real gateway on loopback, raw MQTT clients that
//! read the exact CONNACK code, the real `gateway passwd` binary, JWTs signed in the test
//! and a real HTTP webhook server started by the test. The webhook's own cases are in
//! auth_webhook.rs, password storms in auth_storm.rs.

mod common;

use std::time::Duration;

use common::auth::passwd;
use common::auth::*;
use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn default_anonymous_is_loopback_only_and_credentials_need_a_provider() {
    // BASE keeps the default [auth]: providers = ["anonymous"], anonymous = "loopback".
    let s = TestServer::start("");
    assert_eq!(code(s.mqtt, false, "anon4", None, None).await, V3_OK);
    assert_eq!(code(s.mqtt, true, "anon5", None, None).await, 0x00);
    // Credentials are not anonymous's to judge, and no other provider is configured.
    assert_eq!(
        code(s.mqtt, false, "u4", Some("user"), Some("pw")).await,
        V3_NOT_AUTHORIZED
    );
    assert_eq!(
        code(s.mqtt, true, "u5", Some("user"), Some("pw")).await,
        V5_BAD_CREDENTIALS
    );
    assert_eq!(refused(&s, "auth").await, 2.0);
}

#[tokio::test]
async fn anonymous_never_and_always() {
    let never = TestServer::start("[auth]\nanonymous = \"never\"\n");
    assert_eq!(
        code(never.mqtt, false, "a", None, None).await,
        V3_NOT_AUTHORIZED
    );
    assert_eq!(
        code(never.mqtt, true, "b", None, None).await,
        V5_BAD_CREDENTIALS
    );
    assert_eq!(refused(&never, "auth").await, 2.0);
    let always = TestServer::start("[auth]\nanonymous = \"always\"\n");
    assert_eq!(code(always.mqtt, false, "a", None, None).await, V3_OK);
    assert_eq!(code(always.mqtt, true, "b", None, None).await, 0x00);
    // Not configured at all: nobody gets in.
    let none = TestServer::start("[auth]\nproviders = []\n");
    assert_eq!(
        code(none.mqtt, false, "a", None, None).await,
        V3_NOT_AUTHORIZED
    );
}

/// Runs `gateway passwd FILE USER`, the password on stdin or via --password.

#[tokio::test]
async fn password_file_made_by_gateway_passwd() {
    let dir = tempdir::Dir::new("passwd");
    let file = dir.0.join("users");
    std::fs::write(&file, "# devices\n").unwrap();
    passwd(&file, "alice", Some("s3cret"), None);
    passwd(&file, "bob", None, Some("hunter2"));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("# devices\n"), "comment kept: {text}");
    assert!(text.contains("alice:$argon2id$"), "{text}");
    let bob_line = text
        .lines()
        .find(|l| l.starts_with("bob:"))
        .unwrap()
        .to_string();

    let cfg = format!(
        "[auth]\nproviders = [\"anonymous\", \"password_file\"]\n[auth.password_file]\npath = \"{}\"\n",
        file.display()
    );
    let s = TestServer::start(&cfg);
    assert_eq!(
        code(s.mqtt, false, "a1", Some("alice"), Some("s3cret")).await,
        V3_OK
    );
    assert_eq!(
        code(s.mqtt, true, "b1", Some("bob"), Some("hunter2")).await,
        0x00
    );
    assert_eq!(
        code(s.mqtt, false, "a2", Some("alice"), Some("wrong")).await,
        V3_NOT_AUTHORIZED
    );
    assert_eq!(
        code(s.mqtt, true, "a3", Some("alice"), Some("wrong")).await,
        V5_BAD_CREDENTIALS
    );
    // Unknown user: the file ignores it and nobody else decides.
    assert_eq!(
        code(s.mqtt, true, "c1", Some("carol"), Some("x")).await,
        V5_BAD_CREDENTIALS
    );
    // Anonymous still works from loopback ahead of the file.
    assert_eq!(code(s.mqtt, false, "anon", None, None).await, V3_OK);
    assert_eq!(refused(&s, "auth").await, 3.0);
    drop(s);

    // Changing alice's password keeps bob's line untouched; the new password works.
    passwd(&file, "alice", Some("n3w"), None);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(&bob_line), "{text}");
    assert_eq!(text.matches("alice:").count(), 1, "{text}");
    let s = TestServer::start(&cfg);
    assert_eq!(
        code(s.mqtt, false, "a4", Some("alice"), Some("n3w")).await,
        V3_OK
    );
    assert_eq!(
        code(s.mqtt, false, "a5", Some("alice"), Some("s3cret")).await,
        V3_NOT_AUTHORIZED
    );
}

#[test]
fn a_bad_password_file_stops_the_start_naming_file_and_line() {
    let dir = tempdir::Dir::new("badpasswd");
    let file = dir.0.join("users");
    std::fs::write(&file, "# ok\nalice:not-a-hash\n").unwrap();
    let cfg = config(&format!(
        "[auth]\nproviders = [\"password_file\"]\n[auth.password_file]\npath = \"{}\"\n",
        file.display()
    ));
    let err = match gateway::server::Server::start(cfg, None) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("started with a bad password file"),
    };
    assert!(err.contains(&format!("{}:2", file.display())), "{err}");
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"test-secret"),
    )
    .unwrap()
}

const JWT_HS: &str = r#"
[auth]
providers = ["jwt"]
[auth.jwt]
algorithm = "HS256"
secret = "test-secret"
leeway_secs = 0
[acl]
enabled = true
"#;

#[tokio::test]
async fn jwt_hs256_allow_deny_expiry_and_subject() {
    let s = TestServer::start(JWT_HS);
    let good = |id: &str| hs256(serde_json::json!({"sub": id, "exp": now() + 600}));
    assert_eq!(
        code(s.mqtt, false, "d1", Some("any"), Some(&good("d1"))).await,
        V3_OK
    );
    // MQTT 5 allows a password without a username.
    assert_eq!(
        code(s.mqtt, true, "d2", None, Some(&good("d2"))).await,
        0x00
    );
    // sub is another device.
    assert_eq!(
        code(s.mqtt, true, "d3", Some("any"), Some(&good("d1"))).await,
        V5_BAD_CREDENTIALS
    );
    // Expired.
    let old = hs256(serde_json::json!({"sub": "d4", "exp": now() - 600}));
    assert_eq!(
        code(s.mqtt, false, "d4", Some("any"), Some(&old)).await,
        V3_NOT_AUTHORIZED
    );
    // Signed with another secret.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": "d5", "exp": now() + 600}),
        &EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    assert_eq!(
        code(s.mqtt, true, "d5", Some("any"), Some(&forged)).await,
        V5_BAD_CREDENTIALS
    );
    // Anonymous is not in the providers: no credentials, no entry.
    assert_eq!(
        code(s.mqtt, false, "d6", None, None).await,
        V3_NOT_AUTHORIZED
    );
    assert_eq!(refused(&s, "auth").await, 4.0);
}

#[tokio::test]
async fn jwt_acl_claims_apply_to_that_connection() {
    let s = TestServer::start(JWT_HS);
    let token = hs256(serde_json::json!({
        "sub": "fleet1", "exp": now() + 600,
        "publish": ["fleet/%c/up"], "subscribe": ["fleet/%c/down/#"],
    }));
    // A 3.1.1 CONNACK is exactly the 4 bytes `connack` read.
    let (c, stream) = connack(s.mqtt, false, "fleet1", Some("u"), Some(&token)).await;
    assert_eq!(c, V3_OK);
    let mut raw = Raw::from_stream(stream);
    // Allowed by the claim; devices/fleet1/# would be allowed by the default rules, but
    // the claim replaces them for SUBSCRIBE.
    let mut sub = mqttbytes::v4::Subscribe::new("fleet/fleet1/down/+", mqttbytes::QoS::AtLeastOnce);
    sub.add("devices/fleet1/#".into(), mqttbytes::QoS::AtLeastOnce);
    sub.pkid = 1;
    raw.send(&common::encode(|b| sub.write(b))).await;
    match raw.next_v4(T).await {
        Ok(mqttbytes::v4::Packet::SubAck(a)) => assert_eq!(
            a.return_codes,
            vec![
                mqttbytes::v4::SubscribeReasonCode::Success(mqttbytes::QoS::AtLeastOnce),
                mqttbytes::v4::SubscribeReasonCode::Failure
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    assert_eq!(
        s.metric("gateway_acl_denied_total{action=\"subscribe\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn jwt_rs256_with_a_public_key_file() {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
    let cfg = format!(
        "[auth]\nproviders = [\"jwt\"]\n[auth.jwt]\nalgorithm = \"RS256\"\npublic_key_file = \"{data}/jwt_rs256_public.pem\"\n"
    );
    let s = TestServer::start(&cfg);
    let key =
        EncodingKey::from_rsa_pem(&std::fs::read(format!("{data}/jwt_rs256_private.pem")).unwrap())
            .unwrap();
    let rs =
        |claims: serde_json::Value| encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap();
    let good = rs(serde_json::json!({"sub": "r1", "exp": now() + 600}));
    assert_eq!(
        code(s.mqtt, false, "r1", Some("x"), Some(&good)).await,
        V3_OK
    );
    assert_eq!(
        code(s.mqtt, true, "r2", Some("x"), Some(&good)).await,
        V5_BAD_CREDENTIALS
    );
    let expired = rs(serde_json::json!({"sub": "r3", "exp": now() - 600}));
    assert_eq!(
        code(s.mqtt, true, "r3", None, Some(&expired)).await,
        V5_BAD_CREDENTIALS
    );
    // An HS256 token is refused by an RS256 provider (no algorithm confusion).
    let hs = hs256(serde_json::json!({"sub": "r4", "exp": now() + 600}));
    assert_eq!(
        code(s.mqtt, false, "r4", Some("x"), Some(&hs)).await,
        V3_NOT_AUTHORIZED
    );
}

/// Issue 17.5 for the other providers: `%u` is the password file's user, the name the
/// webhook answered (or, without one, the username it allowed), and nothing for an
/// anonymous client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_u_is_the_name_each_provider_vouched_for() {
    let dir = tempdir::Dir::new("pct-u");
    let file = dir.0.join("users");
    std::fs::write(&file, "").unwrap();
    passwd(&file, "alice", None, Some("s3cret"));
    let b = backend().await;
    let s = TestServer::start(&format!(
        "[auth]\nproviders = [\"anonymous\", \"password_file\", \"http\"]\nfailure_backoff_after = 0\n\
         [auth.password_file]\npath = \"{}\"\n\
         [auth.http]\nurl = \"http://{}/auth\"\ntimeout_ms = 1000\n\
         [acl]\nenabled = true\nno_match = \"deny\"\n\
         rules = [{{ permission = \"allow\", action = \"all\", topic = \"users/%u/#\" }}]\n",
        file.display(),
        b.addr
    ));
    use mqttbytes::v4::SubscribeReasonCode as R4;
    let ok = R4::Success(mqttbytes::QoS::AtLeastOnce);
    let cases = [
        // The password file's user.
        ("p1", Some(("alice", "s3cret")), [ok, R4::Failure]),
        // The webhook names "hooked" whatever username was sent.
        ("h1", Some(("carol", "named")), [R4::Failure, ok]),
        // The webhook allowed "carol" without naming anyone: carol it is.
        ("h2", Some(("carol", "good")), [R4::Failure, R4::Failure]),
        // Anonymous: no %u at all.
        ("a1", None, [R4::Failure, R4::Failure]),
    ];
    for (id, login, want) in cases {
        let (user, pass) = login.unzip();
        let (code, stream) = connack(s.mqtt, false, id, user, pass).await;
        assert_eq!(code, V3_OK, "{id}");
        let mut raw = Raw::from_stream(stream);
        let codes = suback(&mut raw, 1, &["users/alice/#", "users/hooked/#"]).await;
        assert_eq!(codes, want, "{id}");
        if id == "h2" {
            assert_eq!(suback(&mut raw, 2, &["users/carol/#"]).await, vec![ok]);
        }
    }
}
