//! The push API's client for the push suites (tests/push_*.rs): requests with or
//! without a bearer token, answers as (status, JSON body); and a v3.1.1 device.

use serde_json::Value;

use super::{v4, TestServer};

pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub token: Option<String>,
}

impl Api {
    pub fn new(gw: &TestServer) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: format!("http://{}", gw.http),
            token: None,
        }
    }

    pub fn with_token(gw: &TestServer, token: &str) -> Api {
        Api {
            token: Some(token.into()),
            ..Api::new(gw)
        }
    }

    pub fn req(&self, m: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(m, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .req(reqwest::Method::POST, path)
            .json(&body)
            .send()
            .await
            .expect("request");
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn push(&self, body: Value) -> (u16, Value) {
        self.post("/v1/push", body).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let r = self
            .req(reqwest::Method::DELETE, path)
            .send()
            .await
            .expect("request");
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .req(reqwest::Method::GET, path)
            .send()
            .await
            .expect("request");
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }
}

pub async fn device(gw: &TestServer, id: &str, persistent: bool) -> v4::Client {
    let mut o = v4::options(gw.mqtt, id);
    o.set_clean_session(!persistent);
    v4::connect(o).await
}
