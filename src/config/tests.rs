//! Unit tests of `crate::config`: the defaults, loading and merging, and every rule
//! `check-config` enforces, each naming its key.

use super::*;

pub(super) fn invalid_key(toml: &str) -> String {
    match Config::from_toml_str(toml) {
        Err(ConfigError::Invalid { key, .. }) => key,
        other => panic!("expected an Invalid error for {toml:?}, got {other:?}"),
    }
}

#[test]
fn defaults_parse_and_match_the_documented_values() {
    let c = Config::default();
    assert_eq!(c.mqtt.listen, "0.0.0.0:1883".parse::<SocketAddr>().unwrap());
    assert_eq!(c.mqtt.max_packet_size, 1_048_576);
    assert_eq!(c.mqtt.max_client_id_len, 128);
    assert_eq!(c.mqtt.connect_timeout_secs, 10);
    assert_eq!(c.mqtt.max_keepalive_secs, 180);
    assert_eq!(c.mqtt.keepalive_jitter_pct, 0);
    assert_eq!(c.mqtt.duplicate_client_id, DuplicateClientId::Takeover);
    assert_eq!(c.mqtt.max_connections, 1_000_000);
    assert_eq!(c.mqtt.receive_maximum, 64);
    assert_eq!(c.mqtt.max_inflight, 100);
    assert_eq!(c.mqtt.max_queued_messages, 1000);
    assert_eq!(c.mqtt.max_session_expiry_secs, 604_800);
    assert_eq!(c.mqtt.write_stall_timeout_secs, 30);
    assert_eq!(c.mqtt.max_topic_len, 1024);
    assert_eq!(c.mqtt.max_subscriptions_per_client, 1000);
    assert!(c.mqtt.retain_available);
    assert_eq!(c.mqtt.max_retained_messages, 100_000);
    assert_eq!(c.mqtt.max_retained_bytes, 256 << 20);
    assert_eq!(c.mqtt.max_retained_bytes_per_client, 4 << 20);

    assert!(c.tcp.nodelay);
    assert_eq!(c.tcp.backlog, 4096);
    assert_eq!((c.tcp.send_buffer_bytes, c.tcp.recv_buffer_bytes), (0, 0));
    assert_eq!(c.tcp.keepalive_idle_secs, 120);
    assert_eq!(c.tcp.keepalive_interval_secs, 30);
    assert_eq!(c.tcp.keepalive_retries, 4);
    assert_eq!(c.tcp.user_timeout_secs, 60);

    assert_eq!(c.shards.count, 0);
    assert_eq!(c.shards.mailbox_capacity, 4096);
    assert_eq!(c.shards.tick_ms, 1000);
    assert_eq!(c.shards.expiry_batch, 1024);
    assert!(!c.shards.pin_cores);
    assert_eq!(c.shards.drain_timeout_secs, 5);

    assert_eq!(c.buffers.scratch_bytes, 65_536);
    assert_eq!(c.buffers.pool_max_bytes, 67_108_864);
    assert_eq!(c.buffers.pool_idle_secs, 30);
    assert_eq!(c.buffers.outbound_high_watermark, 65_536);
    assert_eq!(c.buffers.outbound_low_watermark, 16_384);
    assert_eq!(c.buffers.slow_consumer, SlowConsumer::Pace);
    assert_eq!(c.buffers.pace_queued_messages, 100);
    assert_eq!(c.buffers.outbound_max_bytes, 4_194_304);

    assert_eq!(c.http.listen, "0.0.0.0:8080".parse::<SocketAddr>().unwrap());
    assert!(c.http.tokens.is_empty());
    assert_eq!(c.http.tokenless_networks, ["127.0.0.0/8", "::1/128"]);
    assert!(!c.http.allow_remote_without_token);
    assert_eq!(c.http.max_connections, 1024);
    assert_eq!(c.http.header_timeout_ms, 10_000);
    assert_eq!(c.http.body_timeout_ms, 30_000);
    assert_eq!(c.http.write_timeout_ms, 30_000);
    assert_eq!(c.http.max_batch_body_bytes, 67_108_864);
    assert_eq!(c.http.max_large_bodies, 4);
    assert_eq!(c.http.business_threads, 2);
    assert_eq!(c.http.max_batch, 1000);
    assert_eq!(c.http.idempotency_window_secs, 300);
    assert_eq!(c.http.answer_timeout_ms, 10_000);
    assert_eq!(c.http.list_max_limit, 1000);
    assert_eq!(c.http.list_scan_max, 10_000);
    assert_eq!(c.http.list_page_bytes, 4 << 20);

    assert_eq!(c.log.level, "info");
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.log.file, None);
    assert_eq!(c.log.queue_lines, 65_536);
}

#[test]
fn every_default_key_is_documented_by_a_comment() {
    // The reference file must explain each key: the line before it, or the line before
    // a run of related keys, is a comment.
    let lines: Vec<&str> = DEFAULT_TOML.lines().map(str::trim).collect();
    for (i, line) in lines.iter().enumerate() {
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let documented = lines[..i]
            .iter()
            .rev()
            .take_while(|l| !l.is_empty())
            .any(|l| l.starts_with('#'));
        assert!(documented, "key line without a comment: {line}");
    }
}

#[test]
fn a_partial_file_changes_only_what_it_names() {
    let c = Config::from_toml_str(
        "[mqtt]\nmax_keepalive_secs = 60\n[http]\ntokens = [\"abc\"]\n[log]\nfile = \"/var/log/gw/gateway.log\"\n",
    )
    .unwrap();
    assert_eq!(c.mqtt.max_keepalive_secs, 60);
    assert_eq!(c.http.tokens, vec!["abc".to_string()]);
    assert_eq!(c.log.file, Some(PathBuf::from("/var/log/gw/gateway.log")));
    // Neighbours in the same sections keep their defaults.
    assert_eq!(c.mqtt.listen.port(), 1883);
    assert_eq!(c.mqtt.max_packet_size, 1_048_576);
    assert_eq!(c.http.listen.port(), 8080);
    assert_eq!(c.log.level, "info");
    assert_eq!(c.tcp.backlog, 4096);
}

#[test]
fn an_empty_file_is_the_defaults() {
    let c = Config::from_toml_str("").unwrap();
    assert_eq!(c.mqtt.max_keepalive_secs, 180);
    assert_eq!(c.shards.tick_ms, 1000);
}

#[test]
fn an_unknown_key_in_any_section_is_named_with_its_path() {
    for section in ["mqtt", "tcp", "shards", "buffers", "http", "log"] {
        let err = Config::from_toml_str(&format!("[{section}]\nbogus_key = 1\n")).unwrap_err();
        match &err {
            ConfigError::UnknownKey { key, known } => {
                assert_eq!(key, &format!("{section}.bogus_key"));
                assert!(!known.is_empty());
            }
            other => panic!("expected UnknownKey, got {other:?}"),
        }
        assert!(
            err.to_string().contains(&format!("`{section}.bogus_key`")),
            "{err}"
        );
    }
}

#[test]
fn a_misspelt_key_is_named_and_the_right_one_suggested() {
    let err = Config::from_toml_str("[mqtt]\nlisen = \"0.0.0.0:1\"\n").unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("config error: unknown key `mqtt.lisen`"),
        "{text}"
    );
    assert!(
        text.contains("(did you mean `listen`? known keys: "),
        "{text}"
    );
    assert!(
        text.contains("max_packet_size"),
        "known keys are listed: {text}"
    );
}

#[test]
fn an_unknown_section_is_named() {
    let err = Config::from_toml_str("[mqttt]\nlisten = \"0.0.0.0:1\"\n").unwrap_err();
    match &err {
        ConfigError::UnknownKey { key, known } => {
            assert_eq!(key, "mqttt");
            assert!(known.contains(&"mqtt".to_string()));
        }
        other => panic!("expected UnknownKey, got {other:?}"),
    }
    let err = Config::from_toml_str("top_level = 1\n").unwrap_err();
    assert!(err.to_string().contains("`top_level`"), "{err}");
}

#[test]
fn serde_unknown_field_errors_name_the_full_path() {
    // The fallback for keys the struct lacks, bypassing reject_unknown_keys.
    let mut table: Table = DEFAULT_TOML.parse().unwrap();
    if let Some(Value::Table(mqtt)) = table.get_mut("mqtt") {
        mqtt.insert("lisen".into(), Value::Integer(1));
    }
    let err = serde_path_to_error::deserialize::<_, Config>(Value::Table(table)).unwrap_err();
    match deserialize_error(err) {
        ConfigError::Invalid { key, message } => {
            assert_eq!(key, "mqtt.lisen");
            assert!(message.contains("unknown field"), "{message}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn a_wrong_type_names_the_key() {
    let err = Config::from_toml_str("[mqtt]\nmax_packet_size = \"big\"\n").unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { key, .. } if key == "mqtt.max_packet_size"),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("config error at key `mqtt.max_packet_size`:"),
        "{err}"
    );
    assert_eq!(invalid_key("[tcp]\nnodelay = 1\n"), "tcp.nodelay");
    assert_eq!(invalid_key("[http]\ntokens = \"abc\"\n"), "http.tokens");
    assert_eq!(
        invalid_key("[http]\ntokens = [\"a\", 2]\n"),
        "http.tokens[1]"
    );
    assert_eq!(invalid_key("mqtt = 5\n"), "mqtt");
    assert_eq!(invalid_key("[mqtt.listen]\nport = 1\n"), "mqtt.listen");
}

#[test]
fn negative_and_oversized_integers_name_the_key() {
    assert_eq!(
        invalid_key("[mqtt]\nmax_connections = -1\n"),
        "mqtt.max_connections"
    );
    assert_eq!(
        invalid_key("[mqtt]\nmax_keepalive_secs = 5000000000\n"),
        "mqtt.max_keepalive_secs"
    );
}

#[test]
fn integers_too_wide_for_their_type_say_the_range() {
    for (toml, key, range) in [
        (
            "[mqtt]\nmax_inflight = 70000",
            "mqtt.max_inflight",
            "must be at most 65535, got 70000",
        ),
        (
            "[mqtt]\nmax_keepalive_secs = -1",
            "mqtt.max_keepalive_secs",
            "must not be negative, got -1",
        ),
        (
            "[mqtt]\nkeepalive_jitter_pct = 300",
            "mqtt.keepalive_jitter_pct",
            "must be at most 255, got 300",
        ),
        (
            "[mqtt]\nmax_connections = 5000000000",
            "mqtt.max_connections",
            "must be at most 4294967295, got 5000000000",
        ),
    ] {
        let e = Config::from_toml_str(toml).unwrap_err().to_string();
        assert!(
            e.contains(&format!("`{key}`")) && e.contains(range),
            "{toml:?}: {e}"
        );
    }
}

#[test]
fn a_bad_address_names_mqtt_listen() {
    let err = Config::from_toml_str("[mqtt]\nlisten = \"not an address\"\n").unwrap_err();
    let text = err.to_string();
    assert_eq!(
        text,
        "config error at key `mqtt.listen`: invalid socket address syntax"
    );
    assert_eq!(invalid_key("[http]\nlisten = \"0.0.0.0\"\n"), "http.listen");
}

#[test]
fn enums_accept_only_their_names() {
    assert_eq!(
        invalid_key("[mqtt]\nduplicate_client_id = \"x\"\n"),
        "mqtt.duplicate_client_id"
    );
    assert_eq!(
        invalid_key("[mqtt]\nduplicate_client_id = \"Takeover\"\n"),
        "mqtt.duplicate_client_id"
    );
    assert_eq!(
        invalid_key("[mqtt]\nkeepalive_zero = \"never\"\n"),
        "mqtt.keepalive_zero"
    );
    let c = Config::from_toml_str("[mqtt]\nduplicate_client_id = \"reject\"\n").unwrap();
    assert_eq!(c.mqtt.duplicate_client_id, DuplicateClientId::Reject);
    assert_eq!(invalid_key("[log]\nformat = \"xml\"\n"), "log.format");
    let c = Config::from_toml_str("[log]\nformat = \"json\"\n").unwrap();
    assert_eq!(c.log.format, LogFormat::Json);
}

#[test]
fn invalid_toml_is_a_parse_error_with_a_position() {
    let err = Config::from_toml_str("[mqtt\nlisten = 1").unwrap_err();
    match &err {
        ConfigError::Parse { message, .. } => assert!(message.contains("line 1"), "{message}"),
        other => panic!("expected Parse, got {other:?}"),
    }
}

#[test]
fn load_reads_a_file_and_names_a_missing_one() {
    let dir = std::env::temp_dir().join(format!("gateway-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(&path, "[shards]\ncount = 3\n").unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!(c.shards.count, 3);
    assert_eq!(c.shard_count(), 3);

    std::fs::write(&path, "[shards]\ncount = \"x\"\n").unwrap();
    assert!(
        matches!(Config::load(&path), Err(ConfigError::Invalid { key, .. }) if key == "shards.count")
    );

    let missing = dir.join("missing.toml");
    match Config::load(&missing) {
        Err(e @ ConfigError::Io { .. }) => {
            assert!(e.to_string().contains("missing.toml"), "{e}")
        }
        other => panic!("expected Io, got {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn thread_counts_fall_back_to_the_cores() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let c = Config::from_toml_str("[shards]\ncount = 0\n[http]\nbusiness_threads = 0\n").unwrap();
    assert_eq!(c.shard_count(), cores);
    assert_eq!(c.business_threads(), cores);
    let c = Config::from_toml_str("[http]\nbusiness_threads = 5\n").unwrap();
    assert_eq!(c.business_threads(), 5);
}

/// Each validation rule: the boundary that passes, and the first value that fails
/// with the key it concerns.
#[test]
fn validate_rules_name_their_keys() {
    let ok = |toml: &str| {
        if let Err(e) = Config::from_toml_str(toml) {
            panic!("{toml:?} should be valid: {e}");
        }
    };
    let cases: &[(&str, &str, &str)] = &[
        (
            "[mqtt]\nmax_packet_size = 16",
            "[mqtt]\nmax_packet_size = 15",
            "mqtt.max_packet_size",
        ),
        (
            "[mqtt]\nmax_packet_size = 268435455",
            "[mqtt]\nmax_packet_size = 268435456",
            "mqtt.max_packet_size",
        ),
        (
            "[mqtt]\nmax_client_id_len = 23",
            "[mqtt]\nmax_client_id_len = 22",
            "mqtt.max_client_id_len",
        ),
        (
            "[mqtt]\nmax_client_id_len = 65535",
            "[mqtt]\nmax_client_id_len = 65536",
            "mqtt.max_client_id_len",
        ),
        (
            "[mqtt]\nclose_grace_ms = 60000",
            "[mqtt]\nclose_grace_ms = 60001",
            "mqtt.close_grace_ms",
        ),
        (
            "[mqtt]\nclose_grace_bytes = 16777216",
            "[mqtt]\nclose_grace_bytes = 16777217",
            "mqtt.close_grace_bytes",
        ),
        (
            "[mqtt]\nconnect_timeout_secs = 1",
            "[mqtt]\nconnect_timeout_secs = 0",
            "mqtt.connect_timeout_secs",
        ),
        (
            "[mqtt]\nmax_keepalive_secs = 1",
            "[mqtt]\nmax_keepalive_secs = 0",
            "mqtt.max_keepalive_secs",
        ),
        (
            "[mqtt]\nmax_keepalive_secs = 65535",
            "[mqtt]\nmax_keepalive_secs = 65536",
            "mqtt.max_keepalive_secs",
        ),
        (
            "[mqtt]\nkeepalive_jitter_pct = 50",
            "[mqtt]\nkeepalive_jitter_pct = 51",
            "mqtt.keepalive_jitter_pct",
        ),
        (
            "[mqtt]\nmax_connections = 1",
            "[mqtt]\nmax_connections = 0",
            "mqtt.max_connections",
        ),
        (
            "[mqtt]\ntopic_alias_maximum = 65535",
            "[mqtt]\ntopic_alias_maximum = 65536",
            "mqtt.topic_alias_maximum",
        ),
        (
            "[mqtt]\noutbound_topic_aliases = 0",
            "[mqtt]\noutbound_topic_aliases = 65536",
            "mqtt.outbound_topic_aliases",
        ),
        (
            "[mqtt]\nreceive_maximum = 1",
            "[mqtt]\nreceive_maximum = 0",
            "mqtt.receive_maximum",
        ),
        (
            "[mqtt]\nreceive_maximum = 65535",
            "[mqtt]\nreceive_maximum = 65536",
            "mqtt.receive_maximum",
        ),
        (
            "[mqtt]\nmax_inflight = 1",
            "[mqtt]\nmax_inflight = 0",
            "mqtt.max_inflight",
        ),
        (
            "[mqtt]\nmax_inflight = 65535",
            "[mqtt]\nmax_inflight = 65536",
            "mqtt.max_inflight",
        ),
        (
            "[mqtt]\nwrite_stall_timeout_secs = 1",
            "[mqtt]\nwrite_stall_timeout_secs = 0",
            "mqtt.write_stall_timeout_secs",
        ),
        (
            "[mqtt]\nmax_topic_len = 1",
            "[mqtt]\nmax_topic_len = 0",
            "mqtt.max_topic_len",
        ),
        (
            "[mqtt]\nmax_topic_len = 65535",
            "[mqtt]\nmax_topic_len = 65536",
            "mqtt.max_topic_len",
        ),
        (
            "[mqtt]\nmax_subscriptions_per_client = 1",
            "[mqtt]\nmax_subscriptions_per_client = 0",
            "mqtt.max_subscriptions_per_client",
        ),
        ("[tcp]\nbacklog = 1", "[tcp]\nbacklog = 0", "tcp.backlog"),
        (
            "[tcp]\naccept_retry_ms = 10000",
            "[tcp]\naccept_retry_ms = 0",
            "tcp.accept_retry_ms",
        ),
        (
            "[tcp]\nbacklog = 2147483647",
            "[tcp]\nbacklog = 2147483648",
            "tcp.backlog",
        ),
        (
            "[tcp]\nsend_buffer_bytes = 2147483647",
            "[tcp]\nsend_buffer_bytes = 2147483648",
            "tcp.send_buffer_bytes",
        ),
        (
            "[tcp]\nrecv_buffer_bytes = 2147483647",
            "[tcp]\nrecv_buffer_bytes = 2147483648",
            "tcp.recv_buffer_bytes",
        ),
        (
            "[tcp]\nkeepalive_idle_secs = 32767",
            "[tcp]\nkeepalive_idle_secs = 32768",
            "tcp.keepalive_idle_secs",
        ),
        (
            "[tcp]\nkeepalive_interval_secs = 1",
            "[tcp]\nkeepalive_interval_secs = 0",
            "tcp.keepalive_interval_secs",
        ),
        (
            "[tcp]\nkeepalive_retries = 127",
            "[tcp]\nkeepalive_retries = 128",
            "tcp.keepalive_retries",
        ),
        (
            "[tcp]\nuser_timeout_secs = 4294967",
            "[tcp]\nuser_timeout_secs = 4294968",
            "tcp.user_timeout_secs",
        ),
        (
            "[shards]\ncount = 1024",
            "[shards]\ncount = 1025",
            "shards.count",
        ),
        (
            "[shards]\nmailbox_capacity = 1",
            "[shards]\nmailbox_capacity = 0",
            "shards.mailbox_capacity",
        ),
        (
            "[shards]\ntick_ms = 100",
            "[shards]\ntick_ms = 99",
            "shards.tick_ms",
        ),
        (
            "[shards]\nexpiry_batch = 1",
            "[shards]\nexpiry_batch = 0",
            "shards.expiry_batch",
        ),
        (
            "[buffers]\nscratch_bytes = 4096",
            "[buffers]\nscratch_bytes = 4095",
            "buffers.scratch_bytes",
        ),
        (
            "[buffers]\nscratch_bytes = 67108864",
            "[buffers]\nscratch_bytes = 67108865",
            "buffers.scratch_bytes",
        ),
        (
            "[buffers]\noutbound_low_watermark = 65535",
            "[buffers]\noutbound_low_watermark = 65536",
            "buffers.outbound_low_watermark",
        ),
        (
            "[http]\ntokens = [\"t0k3n\"]",
            "[http]\ntokens = [\"ok\", \"\"]",
            "http.tokens[1]",
        ),
        (
            "[http]\ntokens = [\"a-b_c.d\"]",
            "[http]\ntokens = [\"has space\"]",
            "http.tokens[0]",
        ),
        (
            "[http]\ntokenless_networks = [\"10.0.0.0/8\", \"::1\"]",
            "[http]\ntokenless_networks = [\"::1\", \"10.0.0.0/33\"]",
            "http.tokenless_networks[1]",
        ),
        (
            "[http]\nmax_connections = 1",
            "[http]\nmax_connections = 0",
            "http.max_connections",
        ),
        (
            "[http]\nheader_timeout_ms = 100",
            "[http]\nheader_timeout_ms = 99",
            "http.header_timeout_ms",
        ),
        (
            "[http]\nmax_large_bodies = 1",
            "[http]\nmax_large_bodies = 0",
            "http.max_large_bodies",
        ),
        (
            "[http]\nmax_batch_body_bytes = 65536",
            "[http]\nmax_batch_body_bytes = 65535",
            "http.max_batch_body_bytes",
        ),
        (
            "[http]\nbody_timeout_ms = 600000",
            "[http]\nbody_timeout_ms = 600001",
            "http.body_timeout_ms",
        ),
        (
            "[http]\nwrite_timeout_ms = 100",
            "[http]\nwrite_timeout_ms = 99",
            "http.write_timeout_ms",
        ),
        (
            "[http]\nbusiness_threads = 1024",
            "[http]\nbusiness_threads = 1025",
            "http.business_threads",
        ),
        (
            "[http]\nmax_batch = 1",
            "[http]\nmax_batch = 0",
            "http.max_batch",
        ),
        (
            "[http]\nlist_max_limit = 100000",
            "[http]\nlist_max_limit = 0",
            "http.list_max_limit",
        ),
        (
            "[http]\nlist_scan_max = 1",
            "[http]\nlist_scan_max = 0",
            "http.list_scan_max",
        ),
        (
            "[http]\nlist_page_bytes = 1",
            "[http]\nlist_page_bytes = 0",
            "http.list_page_bytes",
        ),
        (
            "[log]\nlevel = \"warn\"",
            "[log]\nlevel = \" \"",
            "log.level",
        ),
        (
            "[log]\nfile = \"gateway.log\"",
            "[log]\nfile = \"/var/log/..\"",
            "log.file",
        ),
        (
            "[log]\nqueue_lines = 1",
            "[log]\nqueue_lines = 0",
            "log.queue_lines",
        ),
    ];
    for (good, bad, key) in cases {
        ok(good);
        assert_eq!(invalid_key(bad), *key, "for {bad:?}");
    }
}

#[test]
fn websocket_keys() {
    let c = Config::default();
    assert!(c.mqtt.ws_listen.is_none() && c.mqtt.wss_listen.is_none());
    assert_eq!(c.mqtt.ws_path, "/mqtt");
    assert!(c.mqtt.ws_allowed_origins.is_empty());
    assert_eq!(c.mqtt.ws_max_handshake_bytes, 8192);
    let c = Config::from_toml_str(
        "[mqtt]\nws_listen = \"127.0.0.1:8083\"\nws_path = \"/ws/mqtt\"\n\
         ws_allowed_origins = [\"https://dash.example.com\", \"http://localhost:8080\"]\n",
    )
    .unwrap();
    assert_eq!(c.mqtt.ws_listen, Some("127.0.0.1:8083".parse().unwrap()));
    assert_eq!(c.mqtt.ws_allowed_origins.len(), 2);
    let wss = "[mqtt]\nwss_listen = \"127.0.0.1:8084\"\n";
    Config::from_toml_str(&format!("{wss}tls_cert = \"c\"\ntls_key = \"k\"\n")).unwrap();
    let cases = [
        (wss.to_string(), "mqtt.tls_cert"),
        (format!("{wss}tls_cert = \"c\"\n"), "mqtt.tls_key"),
        ("[mqtt]\nws_listen = \"nope\"\n".into(), "mqtt.ws_listen"),
        (
            "[mqtt]\nws_listen = \"0.0.0.0:1883\"\n".into(),
            "mqtt.ws_listen",
        ),
        (
            "[mqtt]\nws_listen = \"127.0.0.1:8083\"\nwss_listen = \"0.0.0.0:8083\"\n\
             tls_cert = \"c\"\ntls_key = \"k\"\n"
                .into(),
            "mqtt.wss_listen",
        ),
        ("[mqtt]\nws_path = \"mqtt\"\n".into(), "mqtt.ws_path"),
        ("[mqtt]\nws_path = \"/mqtt?x=1\"\n".into(), "mqtt.ws_path"),
        ("[mqtt]\nws_path = \"/a b\"\n".into(), "mqtt.ws_path"),
        (
            "[mqtt]\nws_allowed_origins = [\"dash.example.com\"]\n".into(),
            "mqtt.ws_allowed_origins",
        ),
        (
            "[mqtt]\nws_allowed_origins = [\"https://dash.example.com/\"]\n".into(),
            "mqtt.ws_allowed_origins",
        ),
        (
            "[mqtt]\nws_max_handshake_bytes = 100\n".into(),
            "mqtt.ws_max_handshake_bytes",
        ),
    ];
    for (toml, key) in cases {
        assert_eq!(invalid_key(&toml), key, "for {toml:?}");
    }
}

#[test]
fn tls_proxy_and_limits_keys() {
    let c = Config::default();
    assert!(c.mqtt.tls_listen.is_none() && c.mqtt.tls_client_ca.is_none());
    assert!(!c.mqtt.proxy_protocol);
    let c = Config::from_toml_str(
        "[mqtt]\ntls_listen = \"127.0.0.1:8883\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
    )
    .unwrap();
    assert_eq!(c.mqtt.tls_listen, Some("127.0.0.1:8883".parse().unwrap()));
    assert_eq!(
        invalid_key("[mqtt]\ntls_listen = \"127.0.0.1:8883\"\ntls_key = \"k.pem\"\n"),
        "mqtt.tls_cert"
    );
    assert_eq!(
        invalid_key("[mqtt]\ntls_listen = \"127.0.0.1:8883\"\ntls_cert = \"c.pem\"\n"),
        "mqtt.tls_key"
    );
    assert_eq!(
        invalid_key("[mqtt]\ntls_listen = \"nope\"\n"),
        "mqtt.tls_listen"
    );
    assert_eq!(
        invalid_key("[mqtt]\ntls_listen = \"0.0.0.0:1883\"\ntls_cert = \"c\"\ntls_key = \"k\"\n"),
        "mqtt.tls_listen"
    );
    assert_eq!(
        invalid_key("[mqtt]\nuse_cn_as_client_id = true\n"),
        "mqtt.use_cn_as_client_id"
    );
    assert_eq!(
        invalid_key("[mqtt]\ntls_require_client_cert = true\n"),
        "mqtt.tls_require_client_cert"
    );
    assert_eq!(
        invalid_key("[mqtt]\nproxy_header_max_bytes = 100\n"),
        "mqtt.proxy_header_max_bytes"
    );
    assert_eq!(
        invalid_key("[mqtt]\nproxy_trusted = [\"::1\", \"10.0.0.0/33\"]\n"),
        "mqtt.proxy_trusted[1]"
    );
    assert_eq!(
        invalid_key("[mqtt]\nproxy_protocol = true\nproxy_trusted = []\n"),
        "mqtt.proxy_trusted"
    );
    assert_eq!(
        invalid_key("[mqtt]\ntls_buffer_bytes = 10\n"),
        "mqtt.tls_buffer_bytes"
    );
    assert_eq!(
        invalid_key("[limits]\npublish_rate = 5\npublish_burst = 0\n"),
        "limits.publish_burst"
    );
    assert_eq!(
        invalid_key("[limits]\nmax_connect_rate = 5\nconnect_burst = 0\n"),
        "limits.connect_burst"
    );
    Config::from_toml_str("[limits]\nbytes_rate = 0\nbytes_burst = 0\n").unwrap();
}

#[test]
fn validate_cross_field_rules() {
    // Keepalive interval and retries only matter when keepalive is on.
    Config::from_toml_str(
        "[tcp]\nkeepalive_idle_secs = 0\nkeepalive_interval_secs = 0\nkeepalive_retries = 0\n",
    )
    .unwrap();
    assert_eq!(
        invalid_key("[tcp]\nkeepalive_retries = 0\n"),
        "tcp.keepalive_retries"
    );

    // The wheel must be finer than the shortest timeout.
    Config::from_toml_str("[shards]\ntick_ms = 10000\n").unwrap();
    assert_eq!(invalid_key("[shards]\ntick_ms = 10001\n"), "shards.tick_ms");
    Config::from_toml_str("[shards]\ntick_ms = 20000\n[mqtt]\nconnect_timeout_secs = 20\n")
        .unwrap();

    // The low watermark must sit below the high one, whichever of them is moved.
    assert_eq!(
        invalid_key("[buffers]\noutbound_high_watermark = 16384\n"),
        "buffers.outbound_low_watermark"
    );
    Config::from_toml_str("[buffers]\noutbound_high_watermark = 16385\n").unwrap();
    assert_eq!(
        invalid_key("[buffers]\noutbound_max_bytes = 65535\n"),
        "buffers.outbound_max_bytes"
    );

    // The two listeners must not claim the same port.
    assert_eq!(
        invalid_key("[http]\nlisten = \"0.0.0.0:1883\"\n"),
        "http.listen"
    );
    assert_eq!(
        invalid_key("[http]\nlisten = \"127.0.0.1:1883\"\n"),
        "http.listen"
    );
    assert_eq!(
        invalid_key("[mqtt]\nlisten = \"[::]:8080\"\n"),
        "http.listen"
    );
    Config::from_toml_str(
        "[mqtt]\nlisten = \"127.0.0.1:7000\"\n[http]\nlisten = \"127.0.0.2:7000\"\n",
    )
    .unwrap();
    Config::from_toml_str("[mqtt]\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\n")
        .unwrap();
}

#[test]
fn validate_on_a_modified_struct() {
    let mut c = Config::default();
    c.validate().unwrap();
    c.mqtt.keepalive_jitter_pct = 51;
    assert!(
        matches!(c.validate(), Err(ConfigError::Invalid { key, .. }) if key == "mqtt.keepalive_jitter_pct")
    );
}

#[test]
fn edit_distance_counts_single_edits() {
    assert_eq!(edit_distance("listen", "listen"), 0);
    assert_eq!(edit_distance("lisen", "listen"), 1);
    assert_eq!(edit_distance("max_inflight", "max_inflihgt"), 2);
    assert_eq!(edit_distance("max_inflight", "max_inflite"), 3);
    assert_eq!(edit_distance("", "abc"), 3);
}
