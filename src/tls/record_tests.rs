//! The record layer against rustls itself: a rustls client in memory talks to a rustls
//! server until its handshake is done, then to [`RecordKeys`] made from that server's
//! secrets; every suite of TLS 1.3 and of TLS 1.2 (ECDSA certificates).

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::crypto::{ring as provider, CryptoProvider};
use rustls::pki_types::ServerName;
use rustls::{
    ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection,
    SupportedCipherSuite,
};

use super::*;
use crate::tls::traffic_secret::{take_logged, SecretLog};

const SUITES: [SupportedCipherSuite; 3] = [
    provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
    provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
    provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

const SUITES12: [SupportedCipherSuite; 3] = [
    provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// Every suite of both versions.
fn all_suites() -> impl Iterator<Item = SupportedCipherSuite> {
    SUITES.into_iter().chain(SUITES12)
}

/// The record format of `suite`'s protocol version.
fn version_of(suite: SupportedCipherSuite) -> Version {
    match suite {
        SupportedCipherSuite::Tls13(_) => Version::Tls13,
        SupportedCipherSuite::Tls12(_) => Version::Tls12,
    }
}

fn configs(suite: SupportedCipherSuite) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let (der, pk) = crate::tls::localhost_cert();
    let one_suite = Arc::new(CryptoProvider {
        cipher_suites: vec![suite],
        ..provider::default_provider()
    });
    let version = match version_of(suite) {
        Version::Tls13 => &rustls::version::TLS13,
        Version::Tls12 => &rustls::version::TLS12,
    };
    let mut server = ServerConfig::builder_with_provider(one_suite.clone())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], pk)
        .unwrap();
    server.enable_secret_extraction = true;
    server.key_log = Arc::new(SecretLog);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let mut client = ClientConfig::builder_with_provider(one_suite)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;
    client.key_log = Arc::new(SecretLog);
    (Arc::new(server), Arc::new(client))
}

/// Moves what `a` has to send into `b`.
fn transfer(a: &mut Connection, b: &mut Connection) {
    let mut buf = Vec::new();
    while a.wants_write() {
        a.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        b.read_tls(&mut rd).unwrap();
    }
    b.process_new_packets().unwrap();
}

/// A finished handshake: the client, and the server's keys (rustls dropped) with the
/// traffic secrets its key log gave.
fn session(suite: SupportedCipherSuite) -> (ClientConnection, RecordKeys) {
    let (client, server, logged) = handshake(suite);
    let secrets = server.dangerous_extract_secrets().unwrap();
    let keys = RecordKeys::from_secrets(&secrets, version_of(suite), logged.as_deref()).unwrap();
    (client, keys)
}

/// A finished handshake in memory: the client, the server, and the secrets the server's
/// key log gave (the client's log is taken and dropped on the way).
fn handshake(
    suite: SupportedCipherSuite,
) -> (
    ClientConnection,
    ServerConnection,
    Option<Box<LoggedSecrets>>,
) {
    let (sc, cc) = configs(suite);
    let client = ClientConnection::new(cc, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut client = Connection::Client(client);
    let mut server = Connection::Server(ServerConnection::new(sc).unwrap());
    let mut logged = None;
    while server.is_handshaking() || client.is_handshaking() || server.wants_write() {
        transfer(&mut client, &mut server);
        logged = take_logged().or(logged);
        transfer(&mut server, &mut client);
        take_logged();
    }
    let (Connection::Client(client), Connection::Server(server)) = (client, server) else {
        unreachable!()
    };
    let mut client = client;
    client.set_buffer_limit(None);
    (client, server, logged)
}

/// Opens every whole record of `wire`, as the shard does, feeding it in `step`-byte
/// reads; returns the application bytes.
fn open_all(keys: &mut RecordKeys, wire: &[u8], step: usize) -> Result<Vec<u8>, RecordError> {
    let mut pending = Vec::new();
    let mut got = Vec::new();
    for piece in wire.chunks(step.max(1)) {
        pending.extend_from_slice(piece);
        let mut opener = keys.opener();
        while let Some(len) = record_len(&pending)? {
            let mut record: Vec<u8> = pending.drain(..len).collect();
            if let Opened::Data(r) = opener.open(&mut record)? {
                got.extend_from_slice(&record[r]);
            }
        }
    }
    assert!(pending.is_empty(), "a partial record is left");
    Ok(got)
}

fn client_sends(client: &mut ClientConnection, data: &[u8]) -> Vec<u8> {
    client.writer().write_all(data).unwrap();
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).unwrap();
    }
    wire
}

fn client_reads(client: &mut ClientConnection, wire: &[u8]) -> Vec<u8> {
    let mut rd = wire;
    let mut got = Vec::new();
    while !rd.is_empty() {
        client.read_tls(&mut rd).unwrap();
        client.process_new_packets().unwrap();
        let mut buf = vec![0; 1 << 16];
        loop {
            match client.reader().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
    }
    got
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn both_directions_every_suite_and_size() {
    for suite in all_suites() {
        let (mut client, mut keys) = session(suite);
        for len in [
            0,
            1,
            2,
            100,
            MAX_PLAINTEXT - 1,
            MAX_PLAINTEXT,
            MAX_PLAINTEXT + 1,
            70_000,
        ] {
            let data = pattern(len);
            let wire = client_sends(&mut client, &data);
            assert_eq!(
                open_all(&mut keys, &wire, wire.len()).unwrap(),
                data,
                "{suite:?} {len}"
            );
            let mut out = Vec::new();
            keys.sealer().seal_data(&data, &mut out).unwrap();
            assert_eq!(client_reads(&mut client, &out), data, "{suite:?} {len}");
        }
    }
}

#[test]
fn records_split_at_every_byte_boundary() {
    records_split_at_every_byte_boundary_with(SUITES[0]);
    records_split_at_every_byte_boundary_with(SUITES12[0]);
    records_split_at_every_byte_boundary_with(SUITES12[2]);
}

fn records_split_at_every_byte_boundary_with(suite: SupportedCipherSuite) {
    let (mut client, mut keys) = session(suite);
    let data = pattern(300);
    for step in 1..=40 {
        let wire = client_sends(&mut client, &data);
        assert_eq!(
            open_all(&mut keys, &wire, step).unwrap(),
            data,
            "step {step}"
        );
    }
    // Two records in one read, split at every byte.
    for cut in 0..=60 {
        let mut wire = client_sends(&mut client, b"first");
        wire.extend(client_sends(&mut client, b"second"));
        let (a, b) = wire.split_at(cut.min(wire.len()));
        let mut got = open_all_keep(&mut keys, a);
        got.extend(open_all_keep_finish(&mut keys, b));
        assert_eq!(got, b"firstsecond", "cut {cut}");
    }
}

thread_local! {
    static CARRY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Opens the whole records of `piece` after what an earlier call kept.
fn open_all_keep(keys: &mut RecordKeys, piece: &[u8]) -> Vec<u8> {
    CARRY.with(|c| {
        let mut pending = c.take();
        pending.extend_from_slice(piece);
        let mut got = Vec::new();
        let mut opener = keys.opener();
        while let Some(len) = record_len(&pending).unwrap() {
            let mut record: Vec<u8> = pending.drain(..len).collect();
            if let Opened::Data(r) = opener.open(&mut record).unwrap() {
                got.extend_from_slice(&record[r]);
            }
        }
        *c.borrow_mut() = pending;
        got
    })
}

fn open_all_keep_finish(keys: &mut RecordKeys, piece: &[u8]) -> Vec<u8> {
    let got = open_all_keep(keys, piece);
    CARRY.with(|c| assert!(c.borrow().is_empty()));
    got
}

#[test]
fn a_flipped_byte_is_a_bad_record_mac() {
    for suite in all_suites() {
        let (mut client, keys) = session(suite);
        let wire = client_sends(&mut client, b"hello there");
        for at in HEADER_LEN..wire.len() {
            let mut keys = RecordKeys {
                rx: clone_dir(&keys.rx),
                tx: clone_dir(&keys.tx),
                updates: None,
            };
            let mut bad = wire.clone();
            bad[at] ^= 0x40;
            assert_eq!(
                open_all(&mut keys, &bad, bad.len()),
                Err(RecordError::BadRecordMac),
                "{suite:?} byte {at}"
            );
        }
        let mut keys = keys;
        assert_eq!(open_all(&mut keys, &wire, 3).unwrap(), b"hello there");
    }
}

fn clone_dir(d: &DirectionKeys) -> DirectionKeys {
    DirectionKeys {
        key: d.key,
        iv: d.iv,
        seq: d.seq,
        key_len: d.key_len,
        suite: d.suite,
        version: d.version,
    }
}

#[test]
fn close_notify_both_ways() {
    for suite in [SUITES[2], SUITES12[0], SUITES12[2]] {
        close_notify_both_ways_with(suite);
    }
}

fn close_notify_both_ways_with(suite: SupportedCipherSuite) {
    let (mut client, mut keys) = session(suite);
    let mut out = Vec::new();
    let mut sealer = keys.sealer();
    sealer.seal_data(b"bye", &mut out).unwrap();
    sealer.seal_close_notify(&mut out).unwrap();
    assert_eq!(client_reads(&mut client, &out), b"bye");
    let mut buf = [0; 8];
    assert_eq!(
        client.reader().read(&mut buf).unwrap(),
        0,
        "clean end of stream"
    );

    client.send_close_notify();
    let mut wire = Vec::new();
    client.write_tls(&mut wire).unwrap();
    let len = record_len(&wire).unwrap().unwrap();
    assert_eq!(
        keys.opener().open(&mut wire[..len]),
        Ok(Opened::CloseNotify)
    );
}

/// A rustls client's KeyUpdate (it asks for ours): every suite, several generations,
/// the records after it split at odd sizes. We open what follows with the next key,
/// answer with our KeyUpdate before our next record, and the client reads what we seal
/// after it.
#[test]
fn a_key_update_from_the_client_is_followed_and_answered() {
    for suite in SUITES {
        let (mut client, mut keys) = session(suite);
        assert!(keys.follows_key_updates(), "{suite:?}");
        for round in 0..5u8 {
            client.refresh_traffic_keys().unwrap();
            let wire = client_sends(&mut client, &[round; 40]);
            assert_eq!(open_all(&mut keys, &wire, 7).unwrap(), [round; 40]);
            assert!(owed(&keys), "{suite:?}: the client asked for our update");
            let rx_seq = keys.rx.seq;
            assert_eq!(rx_seq, 1, "{suite:?}: numbered from 0 after the update");
            let mut out = Vec::new();
            keys.sealer().seal_data(&[round; 30], &mut out).unwrap();
            assert!(!owed(&keys));
            assert_eq!(
                keys.tx.seq, 1,
                "{suite:?}: our key moved on after our update"
            );
            assert_eq!(
                client_reads(&mut client, &out),
                [round; 30],
                "{suite:?} {round}"
            );
        }
    }
}

/// The client side of [`both_ends`] sends a KeyUpdate (`request` 0 or 1) and moves its
/// own sending key on, as a TLS 1.3 peer does.
fn send_key_update(client: &mut RecordKeys, request: u8, wire: &mut Vec<u8>) {
    let msg = [KEY_UPDATE, 0, 0, 1, request];
    client.sealer().seal(HANDSHAKE, &msg, wire).unwrap();
    let updates = client.updates.as_deref_mut().unwrap();
    client.tx.update(&mut updates.tx);
}

/// Records after a KeyUpdate in the same read are opened with the next key
/// (`open_many`), and a request is still owed after a later unrequested update.
#[test]
fn one_read_spans_key_updates_and_a_request_stays_owed() {
    let (mut client, mut server) = both_ends(SUITES[1]);
    let mut wire = Vec::new();
    client.sealer().seal_data(b"one ", &mut wire).unwrap();
    send_key_update(&mut client, 1, &mut wire);
    client.sealer().seal_data(b"two ", &mut wire).unwrap();
    send_key_update(&mut client, 0, &mut wire);
    client.sealer().seal_data(b"three", &mut wire).unwrap();
    let batch = server.opener().open_many(&mut wire);
    assert_eq!((batch.plain, batch.used, batch.end), (13, wire.len(), None));
    assert_eq!(&wire[..13], b"one two three");
    assert!(owed(&server), "the first update asked for ours");
    let mut back = Vec::new();
    server.sealer().seal_data(b"ok", &mut back).unwrap();
    assert_eq!(open_all(&mut client, &back, 4).unwrap(), b"ok");
}

/// More than 32 KeyUpdates without application data between them close the connection;
/// application data starts the count again.
#[test]
fn key_updates_without_data_are_limited() {
    let (mut client, mut server) = both_ends(SUITES[0]);
    for round in 0..3 {
        let mut wire = Vec::new();
        for _ in 0..KEY_UPDATES_IN_A_ROW {
            send_key_update(&mut client, 0, &mut wire);
        }
        client.sealer().seal_data(&[round], &mut wire).unwrap();
        assert_eq!(open_all(&mut server, &wire, wire.len()).unwrap(), [round]);
    }
    let mut wire = Vec::new();
    for _ in 0..=KEY_UPDATES_IN_A_ROW {
        send_key_update(&mut client, 0, &mut wire);
    }
    assert_eq!(
        open_all(&mut server, &wire, wire.len()),
        Err(RecordError::UnexpectedMessage(
            "KeyUpdates without application data"
        ))
    );
}

/// KeyUpdates rustls followed while it still ran the connection (a client updating
/// right after its handshake) are caught up with at the hand-over.
#[test]
fn key_updates_before_the_hand_over_are_caught_up_with() {
    let (client, server, logged) = handshake(SUITES[2]);
    let (mut client, mut server) = (Connection::Client(client), Connection::Server(server));
    for _ in 0..3 {
        let Connection::Client(c) = &mut client else {
            unreachable!()
        };
        c.refresh_traffic_keys().unwrap();
        c.writer().write_all(b"x").unwrap();
        transfer(&mut client, &mut server);
        transfer(&mut server, &mut client);
    }
    let (Connection::Client(mut client), Connection::Server(mut server)) = (client, server) else {
        unreachable!()
    };
    let mut got = [0; 3];
    server.reader().read_exact(&mut got).unwrap();
    // As the shard's hand-over does: what rustls owes goes out before its keys are taken.
    crate::tls::traffic_secret::release_owed_key_update(&mut server);
    let mut owed = Vec::new();
    while server.wants_write() {
        server.write_tls(&mut owed).unwrap();
    }
    assert!(!owed.is_empty(), "rustls owed the client a KeyUpdate");
    client_reads(&mut client, &owed);
    let secrets = server.dangerous_extract_secrets().unwrap();
    let mut keys = RecordKeys::from_secrets(&secrets, Version::Tls13, logged.as_deref()).unwrap();
    assert!(keys.follows_key_updates());
    client.refresh_traffic_keys().unwrap();
    let wire = client_sends(&mut client, b"later");
    assert_eq!(open_all(&mut keys, &wire, 3).unwrap(), b"later");
    let mut out = Vec::new();
    keys.sealer().seal_data(b"answer", &mut out).unwrap();
    assert_eq!(client_reads(&mut client, &out), b"answer");
}

/// TLS 1.2 has no KeyUpdate: nothing is kept for one, and its handshake logs nothing
/// (rustls logs its master secret without asking `will_log`).
#[test]
fn tls12_keeps_no_secrets() {
    let (_client, server, logged) = handshake(SUITES12[0]);
    assert!(logged.is_none());
    let secrets = server.dangerous_extract_secrets().unwrap();
    let keys = RecordKeys::from_secrets(&secrets, Version::Tls12, None).unwrap();
    assert!(!keys.follows_key_updates());
}

/// Whether `keys` owe the client a KeyUpdate.
fn owed(keys: &RecordKeys) -> bool {
    keys.updates.as_ref().is_some_and(|u| u.owed)
}

/// Our sending key moves on by itself one record before the AES-GCM limit, and the
/// other end reads on across it (both ends on this layer: a rustls client cannot be
/// made to read 2^24 records in a test). ChaCha20-Poly1305 has no such limit.
#[test]
fn our_sending_key_moves_on_before_its_limit() {
    for suite in [SUITES[0], SUITES[1]] {
        let (mut client, mut server) = both_ends(suite);
        server.tx.seq = AES_GCM_RECORD_LIMIT - 3;
        client.rx.seq = AES_GCM_RECORD_LIMIT - 3;
        let mut out = Vec::new();
        for i in 0..4u8 {
            server.sealer().seal_data(&[i; 10], &mut out).unwrap();
        }
        assert_eq!(server.tx.seq, 2, "{suite:?}: two records on the new key");
        let got = open_all(&mut client, &out, 9).unwrap();
        assert_eq!(
            got,
            [[0u8; 10], [1; 10], [2; 10], [3; 10]].concat(),
            "{suite:?}"
        );
        assert!(!owed(&client));
    }
    let (_client, mut keys) = session(SUITES[2]);
    keys.tx.seq = u64::MAX - 10;
    keys.sealer().seal_data(b"chacha", &mut Vec::new()).unwrap();
    assert_eq!(keys.tx.seq, u64::MAX - 9);
}

/// Without known secrets (none logged, or none that derives the handed-over keys within
/// 32 generations) a KeyUpdate cannot be followed: refused with unexpected_message, as
/// before.
#[test]
fn a_key_update_without_known_secrets_is_refused() {
    let (mut client, server, _) = handshake(SUITES[0]);
    let secrets = server.dangerous_extract_secrets().unwrap();
    let mut keys = RecordKeys::from_secrets(&secrets, Version::Tls13, None).unwrap();
    assert!(!keys.follows_key_updates());
    client.refresh_traffic_keys().unwrap();
    let wire = client_sends(&mut client, b"after");
    assert_eq!(
        open_all(&mut keys, &wire, wire.len()),
        Err(RecordError::KeyUpdate)
    );
    assert_eq!(RecordError::KeyUpdate.alert(), Some(UNEXPECTED_MESSAGE));
}

/// A logged secret that does not derive its direction's key is not kept (it could only
/// be another connection's).
#[test]
fn secrets_that_do_not_derive_the_keys_are_not_kept() {
    let (_, server, logged) = handshake(SUITES[1]);
    let logged = logged.expect("the key log gave the secrets");
    let swapped = LoggedSecrets {
        client: logged.server.clone(),
        server: logged.client.clone(),
    };
    let secrets = server.dangerous_extract_secrets().unwrap();
    let keys = RecordKeys::from_secrets(&secrets, Version::Tls13, Some(&swapped)).unwrap();
    assert!(!keys.follows_key_updates());
}

/// A KeyUpdate must be the whole of its record and ask 0 or 1.
#[test]
fn a_key_update_is_alone_and_well_formed() {
    let cases: [(&[u8], RecordError); 3] = [
        (
            &[KEY_UPDATE, 0, 0, 1, 2],
            RecordError::IllegalParameter("KeyUpdate"),
        ),
        (
            &[KEY_UPDATE, 0, 0, 1, 0, KEY_UPDATE, 0, 0, 1, 0],
            RecordError::UnexpectedMessage("KeyUpdate not alone in its record"),
        ),
        (
            &[4, 0, 0, 1, 0],
            RecordError::UnexpectedMessage("handshake message after the handshake"),
        ),
    ];
    for (msg, want) in cases {
        let (mut client, mut server) = both_ends(SUITES[0]);
        let mut wire = Vec::new();
        client.sealer().seal(HANDSHAKE, msg, &mut wire).unwrap();
        assert_eq!(server.opener().open(&mut wire), Err(want.clone()));
        assert!(want.alert().is_some());
    }
    assert_eq!(
        RecordError::IllegalParameter("KeyUpdate").alert(),
        Some(ILLEGAL_PARAMETER)
    );
}

/// Both ends on this record layer, updating each other for many generations in turn:
/// each side opens what the other seals after its update.
#[test]
fn both_ends_follow_each_others_updates() {
    for suite in SUITES {
        let (mut client, mut server) = both_ends(suite);
        assert!(client.follows_key_updates() && server.follows_key_updates());
        for round in 0..40u8 {
            let (from, to) = if round % 2 == 0 {
                (&mut client, &mut server)
            } else {
                (&mut server, &mut client)
            };
            from.updates.as_mut().unwrap().owed = true;
            let mut wire = Vec::new();
            from.sealer().seal_data(&[round; 3], &mut wire).unwrap();
            assert_eq!(open_all(to, &wire, 5).unwrap(), [round; 3], "{suite:?}");
            assert!(!owed(to), "update_not_requested asks nothing back");
        }
    }
}

#[test]
fn our_alert_reaches_the_client() {
    for suite in [SUITES[1], SUITES12[1], SUITES12[2]] {
        let (mut client, mut keys) = session(suite);
        let mut out = Vec::new();
        keys.sealer().seal_alert(BAD_RECORD_MAC, &mut out).unwrap();
        client.read_tls(&mut &out[..]).unwrap();
        let e = client.process_new_packets().unwrap_err();
        assert!(e.to_string().contains("BadRecordMac"), "{suite:?}: {e}");
    }
}

/// TLS 1.2 after the handshake: a handshake record (a renegotiation) and a
/// change_cipher_spec are refused; a record too short for its explicit nonce and tag is a
/// bad MAC; a record whose plaintext would pass 2^14 is an overflow.
#[test]
fn tls12_refuses_what_follows_no_application_record() {
    let (_client, mut keys) = session(SUITES12[0]);
    let mut hello = [HANDSHAKE, 3, 3, 0, 4, 1, 0, 0, 0];
    assert_eq!(
        keys.opener().open(&mut hello),
        Err(RecordError::UnexpectedMessage("renegotiation"))
    );
    let mut ccs = [CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1];
    assert!(matches!(
        keys.opener().open(&mut ccs),
        Err(RecordError::UnexpectedMessage(_))
    ));
    // 23 body bytes: one short of an explicit nonce and a tag.
    let mut short = [&[APPLICATION_DATA, 3, 3, 0, 23][..], &[0u8; 23]].concat();
    assert_eq!(
        keys.opener().open(&mut short),
        Err(RecordError::BadRecordMac)
    );
    let body = 8 + MAX_PLAINTEXT + 1 + TAG_LEN;
    let mut long = vec![0u8; HEADER_LEN + body];
    long[..3].copy_from_slice(&[APPLICATION_DATA, 3, 3]);
    long[3..5].copy_from_slice(&(body as u16).to_be_bytes());
    assert_eq!(
        keys.opener().open(&mut long),
        Err(RecordError::RecordOverflow)
    );
}

/// The explicit nonce a TLS 1.2 AES-GCM record carries is ours to choose and rustls
/// reads it from the record: two records never repeat one, and a ChaCha20 record has
/// none (its length is the plaintext's plus the tag).
#[test]
fn tls12_record_shapes() {
    let (_client, mut keys) = session(SUITES12[0]);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    keys.sealer().seal_data(b"x", &mut a).unwrap();
    keys.sealer().seal_data(b"x", &mut b).unwrap();
    assert_eq!(a.len(), HEADER_LEN + 8 + 1 + TAG_LEN);
    assert_eq!(a[0], APPLICATION_DATA);
    assert_ne!(a[5..13], b[5..13], "an explicit nonce was used twice");
    let (_client, mut keys) = session(SUITES12[2]);
    let mut c = Vec::new();
    keys.sealer().seal_alert(BAD_RECORD_MAC, &mut c).unwrap();
    assert_eq!(c.len(), HEADER_LEN + 2 + TAG_LEN);
    assert_eq!(c[0], ALERT, "a TLS 1.2 alert record says so in its header");
}

#[test]
fn headers_are_checked() {
    assert_eq!(record_len(&[23, 3, 3, 0]), Ok(None));
    assert_eq!(record_len(&[23, 3, 3, 0, 1]), Ok(None));
    assert_eq!(record_len(&[23, 3, 3, 0, 1, 9]), Ok(Some(6)));
    let too_long = (MAX_CIPHERTEXT + 1) as u16;
    let [hi, lo] = too_long.to_be_bytes();
    assert_eq!(
        record_len(&[23, 3, 3, hi, lo]),
        Err(RecordError::RecordOverflow)
    );
    let (_client, mut keys) = session(SUITES[0]);
    let mut ccs = [20, 3, 3, 0, 1, 1];
    assert!(matches!(
        keys.opener().open(&mut ccs),
        Err(RecordError::UnexpectedMessage(_))
    ));
    let mut short = [23, 3, 3, 0, 3, 1, 2, 3];
    assert_eq!(
        keys.opener().open(&mut short),
        Err(RecordError::BadRecordMac)
    );
}

#[test]
fn an_idle_connection_keeps_only_its_keys() {
    assert_eq!(std::mem::size_of::<DirectionKeys>(), 56);
    assert_eq!(std::mem::size_of::<RecordKeys>(), 120);
    // Out of line, TLS 1.3 only: a 112-byte malloc chunk.
    assert!(std::mem::size_of::<KeyUpdates>() <= 104);
}

#[test]
fn many_records_open_to_the_front_in_order() {
    let (mut client, mut keys) = session(SUITES[0]);
    let mut wire = Vec::new();
    for part in [&b"one"[..], b"", b"three", &pattern(MAX_PLAINTEXT + 5)] {
        wire.extend(client_sends(&mut client, part));
    }
    let whole = wire.len();
    wire.extend_from_slice(&client_sends(&mut client, b"tail")[..7]);
    let batch = keys.opener().open_many(&mut wire);
    let mut want = b"onethree".to_vec();
    want.extend(pattern(MAX_PLAINTEXT + 5));
    assert_eq!(
        (batch.plain, batch.used, batch.end),
        (want.len(), whole, None)
    );
    assert_eq!(&wire[..batch.plain], &want[..]);

    let (mut client, mut keys) = session(SUITES[2]);
    let mut wire = client_sends(&mut client, b"last");
    client.send_close_notify();
    client.write_tls(&mut wire).unwrap();
    wire.extend_from_slice(b"ignored after close_notify");
    let batch = keys.opener().open_many(&mut wire);
    assert_eq!((batch.plain, batch.end), (4, Some(Ok(()))));
    assert_eq!(&wire[..4], b"last");
}

#[test]
fn the_cursor_knows_record_boundaries_at_any_split() {
    let (mut client, _keys) = session(SUITES[0]);
    let mut wire = client_sends(&mut client, b"a");
    wire.extend(client_sends(&mut client, &pattern(MAX_PLAINTEXT + 10)));
    let mut ends = Vec::new();
    let mut end = 0;
    while end < wire.len() {
        end += record_len(&wire[end..]).unwrap().unwrap();
        ends.push(end);
    }
    assert_eq!(ends.len(), 3);
    for step in [1, 2, 3, 4, 5, 6, 7, 100, 4096] {
        let mut c = Cursor::default();
        let mut at = 0;
        for piece in wire.chunks(step) {
            c.advance(piece);
            at += piece.len();
            let boundary = ends.contains(&at);
            assert_eq!(c.at_boundary(), boundary, "step {step} at {at}");
        }
    }
}

/// Garbage never panics the opener, on either version: 20,000 seeded random records of
/// every content type and of lengths around the explicit nonce and tag sizes are all
/// refused (none can carry a valid tag).
#[test]
fn random_records_are_refused_without_panicking() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for suite in [SUITES[0], SUITES12[0], SUITES12[2]] {
        let (_client, mut keys) = session(suite);
        for _ in 0..20_000 / 3 {
            let len = (next() % 64) as usize;
            let mut record = vec![20 + (next() % 6) as u8, 3, 3];
            record.extend_from_slice(&(len as u16).to_be_bytes());
            record.extend((0..len).map(|_| next() as u8));
            let rx = clone_dir(&keys.rx);
            assert!(keys.opener().open(&mut record).is_err(), "{suite:?}");
            keys.rx = rx;
        }
    }
}

/// Both ends on the record layer: the client's keys (to seal what a rustls client
/// cannot be made to send) and the server's.
fn both_ends(suite: SupportedCipherSuite) -> (RecordKeys, RecordKeys) {
    let (client, server, logged) = handshake(suite);
    let version = version_of(suite);
    let server_secrets = server.dangerous_extract_secrets().unwrap();
    let server = RecordKeys::from_secrets(&server_secrets, version, logged.as_deref()).unwrap();
    // The client receives with the server's secret and sends with its own.
    let mirrored = logged.map(|l| LoggedSecrets {
        client: l.server.clone(),
        server: l.client.clone(),
    });
    let secrets = client.dangerous_extract_secrets().unwrap();
    (
        RecordKeys::from_secrets(&secrets, version, mirrored.as_ref()).unwrap(),
        server,
    )
}

/// Alert levels: TLS 1.3 ignores them (RFC 8446 §6); TLS 1.2 ends the connection on a
/// fatal user_canceled, passes over a warning one, and refuses an unknown level.
#[test]
fn alert_levels_per_version() {
    let cases: [(SupportedCipherSuite, [u8; 2], Result<Opened, RecordError>); 6] = [
        (SUITES[0], [2, USER_CANCELED], Ok(Opened::Nothing)),
        (SUITES[0], [2, CLOSE_NOTIFY], Ok(Opened::CloseNotify)),
        (SUITES12[0], [1, USER_CANCELED], Ok(Opened::Nothing)),
        (
            SUITES12[0],
            [2, USER_CANCELED],
            Err(RecordError::PeerAlert(USER_CANCELED)),
        ),
        (
            SUITES12[2],
            [3, USER_CANCELED],
            Err(RecordError::UnexpectedMessage("alert level")),
        ),
        (SUITES12[2], [1, CLOSE_NOTIFY], Ok(Opened::CloseNotify)),
    ];
    for (suite, body, want) in cases {
        let (mut client, mut server) = both_ends(suite);
        let mut wire = Vec::new();
        client.sealer().seal(ALERT, &body, &mut wire).unwrap();
        assert_eq!(server.opener().open(&mut wire), want, "{suite:?} {body:?}");
    }
}

/// The AES-GCM limit binds what we send (2^24.5 records in TLS 1.3, 2^24 in TLS 1.2),
/// not what we receive: a client that keeps to its own limit is not cut off early. A
/// key that cannot move on (TLS 1.2; TLS 1.3 without known secrets) is used up there.
#[test]
fn only_sending_has_a_record_limit() {
    for (suite, limit) in [
        (SUITES[0], AES_GCM_RECORD_LIMIT),
        (SUITES12[0], AES_GCM_TLS12_RECORD_LIMIT),
    ] {
        let (_client, mut keys) = session(suite);
        keys.updates = None;
        keys.tx.seq = limit - 1;
        let mut out = Vec::new();
        assert!(keys.sealer().seal_data(b"last", &mut out).is_ok());
        assert_eq!(
            keys.sealer().seal_data(b"one too many", &mut out),
            Err(RecordError::KeyExhausted),
            "{suite:?}"
        );
        keys.rx.seq = limit + 1_000;
        assert!(keys.rx.next_in().is_ok(), "{suite:?}");
    }
    let (_client, mut keys) = session(SUITES12[2]);
    keys.tx.seq = AES_GCM_RECORD_LIMIT * 4;
    assert!(keys.sealer().seal_data(b"chacha", &mut Vec::new()).is_ok());
}
