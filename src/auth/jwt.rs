//! The `jwt` provider: a signed JSON Web Token in the CONNECT password field.
//!
//! One algorithm is configured, HS256 (shared secret) or RS256 (RSA public key in a PEM
//! file); a token signed with any other algorithm is refused, so an RS256 public key can
//! never be used as an HMAC secret. The token must carry `exp` (checked with
//! `leeway_secs`), and its `client_id_claim` (default `sub`) must equal the CONNECT's
//! client id. The `username_claim` (default `sub`) is the connection's authenticated
//! username, what `%u` stands for in ACL rules; the CONNECT's username field is not
//! trusted (a token for `dev-x` sent with username `carol` is `dev-x` to the ACL), and a
//! token without that claim (or `username_claim = ""`) gives no `%u` at all.
//! Optional `publish_claim` / `subscribe_claim` arrays of topic filters
//! (`%c`/`%u` allowed) become that connection's ACL, replacing the configured rules for
//! that action (see [`crate::acl`]).
//!
//! A password that is not shaped like a JWT (three base64url parts with a readable header)
//! is not this provider's: the next provider is asked, so `jwt` and `password_file` can be
//! combined.

use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{Answer, Verdict};
use crate::acl::ConnAcl;

/// `[auth.jwt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret.
    pub secret: String,
    /// RS256: PEM file of the RSA public key.
    pub public_key_file: String,
    pub client_id_claim: String,
    /// The claim whose value `%u` stands for; "" = JWT connections have no `%u`.
    pub username_claim: String,
    pub publish_claim: String,
    pub subscribe_claim: String,
    pub leeway_secs: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
}

impl JwtConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        match self.algorithm {
            JwtAlgorithm::HS256 if self.secret.is_empty() => {
                Err(("auth.jwt.secret".into(), "HS256 needs a secret".into()))
            }
            JwtAlgorithm::RS256 if self.public_key_file.is_empty() => Err((
                "auth.jwt.public_key_file".into(),
                "RS256 needs a public key PEM file".into(),
            )),
            _ if self.client_id_claim.is_empty() => Err((
                "auth.jwt.client_id_claim".into(),
                "must name a claim (e.g. \"sub\")".into(),
            )),
            _ => Ok(()),
        }
    }
}

pub struct Jwt {
    key: DecodingKey,
    validation: Validation,
    client_id_claim: String,
    username_claim: String,
    publish_claim: String,
    subscribe_claim: String,
}

impl Jwt {
    /// Reads the key file (at start).
    pub fn from_config(c: &JwtConfig) -> Result<Jwt, String> {
        let (alg, key) = match c.algorithm {
            JwtAlgorithm::HS256 => (
                Algorithm::HS256,
                DecodingKey::from_secret(c.secret.as_bytes()),
            ),
            JwtAlgorithm::RS256 => {
                let pem = std::fs::read(&c.public_key_file).map_err(|e| {
                    format!(
                        "auth.jwt.public_key_file: cannot read {}: {e}",
                        c.public_key_file
                    )
                })?;
                let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                    format!(
                        "auth.jwt.public_key_file: {} is not an RSA public key PEM: {e}",
                        c.public_key_file
                    )
                })?;
                (Algorithm::RS256, key)
            }
        };
        let mut validation = Validation::new(alg);
        validation.leeway = u64::from(c.leeway_secs);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Ok(Jwt {
            key,
            validation,
            client_id_claim: c.client_id_claim.clone(),
            username_claim: c.username_claim.clone(),
            publish_claim: c.publish_claim.clone(),
            subscribe_claim: c.subscribe_claim.clone(),
        })
    }

    pub fn check(&self, client_id: &str, password: Option<&[u8]>) -> Answer {
        let Some(token) = password.and_then(|p| std::str::from_utf8(p).ok()) else {
            return Answer::Ignore;
        };
        if token.split('.').count() != 3 || decode_header(token).is_err() {
            return Answer::Ignore;
        }
        let deny = |why: String| Answer::Decided(Verdict::Deny(why));
        let claims = match decode::<Map<String, Value>>(token, &self.key, &self.validation) {
            Ok(data) => data.claims,
            Err(e) => return deny(format!("invalid token: {e}")),
        };
        match claims.get(&self.client_id_claim).and_then(Value::as_str) {
            Some(id) if id == client_id => {}
            Some(_) => {
                return deny(format!(
                    "token claim {:?} does not match the client id",
                    self.client_id_claim
                ))
            }
            None => return deny(format!("token has no {:?} claim", self.client_id_claim)),
        }
        let list = |name: &str| -> Result<Option<Vec<String>>, String> {
            match claims.get(name) {
                None => Ok(None),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| format!("claim {name:?} holds a non-string"))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some),
                Some(_) => Err(format!("claim {name:?} is not an array of topic filters")),
            }
        };
        let username = claims.get(&self.username_claim).and_then(Value::as_str);
        let acl = list(&self.publish_claim)
            .and_then(|p| Ok((p, list(&self.subscribe_claim)?)))
            .and_then(|(p, s)| ConnAcl::from_lists(p, s));
        match acl {
            Ok(acl) if acl.has_lists() || username.is_some() => {
                Answer::Decided(Verdict::Allow(Some(Box::new(acl.with_username(username)))))
            }
            Ok(_) => Answer::Decided(Verdict::Allow(None)),
            Err(e) => deny(format!("bad ACL claim: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn config() -> JwtConfig {
        crate::config::Config::default().auth.jwt
    }

    fn hs(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn hs256_checks_signature_expiry_and_subject() {
        let mut c = config();
        c.secret = "k".into();
        let j = Jwt::from_config(&c).unwrap();
        let good = hs(serde_json::json!({"sub": "dev1", "exp": now() + 60}), "k");
        assert_eq!(
            j.check("dev1", Some(good.as_bytes())),
            Answer::Decided(Verdict::Allow(Some(Box::new(ConnAcl::named("dev1")))))
        );
        let denied = |a: Answer| matches!(a, Answer::Decided(Verdict::Deny(_)));
        assert!(denied(j.check("dev2", Some(good.as_bytes()))));
        let forged = hs(
            serde_json::json!({"sub": "dev1", "exp": now() + 60}),
            "other",
        );
        assert!(denied(j.check("dev1", Some(forged.as_bytes()))));
        let expired = hs(serde_json::json!({"sub": "dev1", "exp": now() - 3600}), "k");
        assert!(denied(j.check("dev1", Some(expired.as_bytes()))));
        let no_exp = hs(serde_json::json!({"sub": "dev1"}), "k");
        assert!(denied(j.check("dev1", Some(no_exp.as_bytes()))));
        assert_eq!(j.check("dev1", Some(b"plain password")), Answer::Ignore);
        assert_eq!(j.check("dev1", None), Answer::Ignore);
    }

    #[test]
    fn the_username_is_the_configured_claim_never_the_connect_field() {
        let mut c = config();
        c.secret = "k".into();
        c.username_claim = "user".into();
        let j = Jwt::from_config(&c).unwrap();
        let name = |t: &str| match j.check("d", Some(t.as_bytes())) {
            Answer::Decided(Verdict::Allow(acl)) => acl.and_then(|a| a.username),
            other => panic!("{other:?}"),
        };
        let with = hs(
            serde_json::json!({"sub": "d", "user": "dave", "exp": now() + 60}),
            "k",
        );
        assert_eq!(name(&with).as_deref(), Some("dave"));
        let without = hs(serde_json::json!({"sub": "d", "exp": now() + 60}), "k");
        assert_eq!(name(&without), None);
    }

    #[test]
    fn acl_claims_become_the_connection_acl() {
        let mut c = config();
        c.secret = "k".into();
        let j = Jwt::from_config(&c).unwrap();
        let t = hs(
            serde_json::json!({"sub": "d", "exp": now() + 60, "publish": ["up/%c"], "subscribe": ["down/%c/#"]}),
            "k",
        );
        let Answer::Decided(Verdict::Allow(Some(acl))) = j.check("d", Some(t.as_bytes())) else {
            panic!("expected an ACL");
        };
        assert_eq!(acl.publish.as_deref().map(<[_]>::len), Some(1));
        assert_eq!(acl.subscribe.as_deref().map(<[_]>::len), Some(1));
        let bad = hs(
            serde_json::json!({"sub": "d", "exp": now() + 60, "publish": "x"}),
            "k",
        );
        assert!(matches!(
            j.check("d", Some(bad.as_bytes())),
            Answer::Decided(Verdict::Deny(_))
        ));
    }
}
