//! A real webhook receiver for the events tests: an axum server on a loopback listener
//! that checks `X-Gateway-Signature` with its own secret (401 on a mismatch, 200
//! otherwise) and keeps every POST.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use gateway::events::webhook::signature;
use serde_json::Value;

/// One POST the webhook received.
#[derive(Clone, Debug)]
pub struct Post {
    pub body: Vec<u8>,
    /// Whether `X-Gateway-Signature` matched the receiver's own secret.
    pub signature_ok: bool,
}

/// A webhook receiver that checks the signature with its own secret and answers 401 on a
/// mismatch, 200 otherwise.
#[derive(Clone)]
pub struct Receiver {
    secret: Arc<Vec<u8>>,
    posts: Arc<Mutex<Vec<Post>>>,
}

impl Receiver {
    pub fn new(secret: &str) -> Receiver {
        Receiver {
            secret: Arc::new(secret.as_bytes().to_vec()),
            posts: Default::default(),
        }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/hook", post(receive))
            .with_state(self.clone())
    }

    /// Serves on `listener` (plain HTTP) in the background.
    pub fn serve(&self, listener: tokio::net::TcpListener) {
        let app = self.router();
        tokio::spawn(async move { axum::serve(listener, app).await });
    }

    pub fn posts(&self) -> Vec<Post> {
        self.posts.lock().unwrap().clone()
    }

    /// Every event received, in order of arrival.
    pub fn events(&self) -> Vec<Value> {
        self.posts()
            .iter()
            .flat_map(
                |p| match serde_json::from_slice::<Value>(&p.body).unwrap() {
                    Value::Array(items) => items,
                    other => panic!("a POST body is not a JSON array: {other}"),
                },
            )
            .collect()
    }
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let got = headers
        .get("x-gateway-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let signature_ok = got == signature(&r.secret, &body);
    r.posts.lock().unwrap().push(Post {
        body: body.to_vec(),
        signature_ok,
    });
    if signature_ok {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    }
}
