//! The dashboard's JSON API over HTTP, on an in-memory queue: tokens and roles, the
//! documents, and each action moving what it says.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use queue_core::{ChannelSpec, Outcome, Outgoing, Queue, codec};
use queue_runtime::dashboard::{Dashboard, DashboardAuth};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ORDERS: &str = "dash/orders";
const MAIL: &str = "dash/mail";

fn orders() -> ChannelSpec {
    ChannelSpec {
        lease: Duration::from_secs(30),
        max_attempts: 5,
        ..ChannelSpec::new(ORDERS)
    }
}

fn mail() -> ChannelSpec {
    ChannelSpec {
        max_attempts: 1,
        ..ChannelSpec::new(MAIL)
    }
}

fn outgoing(doc: Value) -> Outgoing {
    let bson = bson::Bson::try_from(doc).unwrap();
    Outgoing {
        payload: codec::encode(&bson).unwrap(),
        dedup_key: None,
        delay: Duration::ZERO,
        priority: 0,
        group: None,
    }
}

/// 3 ready orders; 3 dead mails, two with one error text and one with another.
async fn seed(queue: &Queue) {
    let batch = (1..=3).map(|n| outgoing(json!({ "n": n }))).collect();
    queue.produce_raw(&orders(), batch).await.unwrap();
    let batch = ["a@x", "b@x", "c@x"]
        .iter()
        .map(|to| outgoing(json!({ "to": to })))
        .collect();
    queue.produce_raw(&mail(), batch).await.unwrap();
    let sub = queue.adapter().subscribe(&mail(), 3).await.unwrap();
    for _ in 0..3 {
        let d = sub.next().await.unwrap();
        let to = codec::decode_value(&d.payload).unwrap();
        let error = if to.as_document().unwrap().get_str("to").unwrap() == "c@x" {
            "bad address"
        } else {
            "smtp down"
        };
        let retry = Outcome::Retry {
            after: None,
            error: error.into(),
        };
        queue.adapter().settle(&d.lease, retry).await.unwrap();
    }
}

async fn serve(queue: Queue) -> SocketAddr {
    let auth = DashboardAuth {
        token: Some("admin-secret".into()),
        read_token: Some("viewer-secret".into()),
    };
    let dashboard = Dashboard::new(queue, auth, Arc::new(|| vec![orders(), mail()]));
    let (addr, _task) = Arc::new(dashboard)
        .serve("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    addr
}

/// One HTTP/1.1 request; the status and the body as JSON (or as a string).
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    let value = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
    (status, value)
}

fn row<'a>(overview: &'a Value, channel: &str) -> &'a Value {
    overview["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["channel"] == channel)
        .unwrap_or_else(|| panic!("no {channel} in {overview}"))
}

#[tokio::test]
async fn tokens_decide_who_reads_and_who_acts() {
    let queue = queue_runtime::connect("memory://").await.unwrap();
    seed(&queue).await;
    let addr = serve(queue.clone()).await;
    let (status, _) = call(addr, "GET", "/api/overview", None, None).await;
    assert_eq!(status, 401);
    let (status, _) = call(addr, "GET", "/api/overview", Some("nope"), None).await;
    assert_eq!(status, 401);
    let (status, who) = call(addr, "GET", "/api/whoami", Some("viewer-secret"), None).await;
    assert_eq!((status, who), (200, json!({ "role": "viewer" })));
    let (_, who) = call(addr, "GET", "/api/whoami", Some("admin-secret"), None).await;
    assert_eq!(who, json!({ "role": "admin" }));
    let redrive_all = json!({ "channel": MAIL, "ids": null });
    let (status, answer) = call(
        addr,
        "POST",
        "/api/redrive",
        Some("viewer-secret"),
        Some(redrive_all.clone()),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    let (status, overview) = call(addr, "GET", "/api/overview", Some("viewer-secret"), None).await;
    assert_eq!(status, 200);
    assert_eq!(row(&overview, MAIL)["dead"], 3, "the viewer moved nothing");
    let (status, answer) = call(
        addr,
        "POST",
        "/api/redrive",
        Some("admin-secret"),
        Some(redrive_all),
    )
    .await;
    assert_eq!((status, answer), (200, json!({ "moved": 3 })));
    // Malformed requests are answered in the API's error shape, and move nothing.
    let (status, answer) = call(addr, "GET", "/api/messages", Some("admin-secret"), None).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].is_string(), "{answer}");
    let (status, answer) = call(
        addr,
        "POST",
        "/api/purge_dead",
        Some("admin-secret"),
        Some(json!("not an object")),
    )
    .await;
    assert!((400..500).contains(&status), "{status} {answer}");
    assert!(answer["error"].is_string(), "{answer}");
    // The page itself is served without a token.
    let (status, page) = call(addr, "GET", "/", None, None).await;
    assert_eq!(status, 200);
    assert!(page.as_str().unwrap().contains("<html"), "{page}");
}

#[tokio::test]
async fn the_documents_show_the_queue_and_the_actions_move_it() {
    let queue = queue_runtime::connect("memory://").await.unwrap();
    seed(&queue).await;
    let addr = serve(queue.clone()).await;
    let admin = Some("admin-secret");

    let (_, overview) = call(addr, "GET", "/api/overview", admin, None).await;
    let o = row(&overview, ORDERS);
    assert_eq!(
        (o["ready"].as_u64(), o["dead"].as_u64()),
        (Some(3), Some(0))
    );
    assert!(o["oldest_ready_age_ms"].is_u64(), "{o}");
    assert_eq!(row(&overview, MAIL)["dead"], 3);

    let (_, channel) = call(addr, "GET", "/api/channel?name=dash/orders", admin, None).await;
    let options = channel["options"].as_array().unwrap();
    assert!(options.contains(&json!(["lease", "30s"])), "{channel}");
    assert!(options.contains(&json!(["max_attempts", "5"])), "{channel}");

    let (_, list) = call(
        addr,
        "GET",
        "/api/messages?channel=dash/orders",
        admin,
        None,
    )
    .await;
    let messages = list["messages"].as_array().unwrap();
    let payloads: Vec<&Value> = messages.iter().map(|m| &m["payload"]).collect();
    assert_eq!(
        payloads,
        [&json!({"n": 1}), &json!({"n": 2}), &json!({"n": 3})]
    );
    let first = messages[0]["id"].as_str().unwrap().to_string();
    let path = format!("/api/message?channel=dash/orders&id={first}");
    let (_, detail) = call(addr, "GET", &path, admin, None).await;
    assert_eq!(detail["message"]["payload"], json!({"n": 1}));
    let m = &detail["message"];
    assert!(m["due"].as_u64() >= m["produced_at"].as_u64(), "{m}");
    assert_eq!(detail["history"][0]["event"], "produced");

    // Histories are kept from the moment the dashboard runs: a delivery and its retry, by
    // the second subscription of the store (the seed held the first).
    let sub = queue.adapter().subscribe(&orders(), 1).await.unwrap();
    let d = sub.next().await.unwrap();
    assert_eq!(d.lease.id.to_string(), first);
    let retry = Outcome::Retry {
        after: None,
        error: "flaky".into(),
    };
    queue.adapter().settle(&d.lease, retry).await.unwrap();
    sub.stop().await;
    let (_, detail) = call(addr, "GET", &path, admin, None).await;
    let events: Vec<(&str, &str)> = detail["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["event"].as_str().unwrap(), e["detail"].as_str().unwrap()))
        .collect();
    let token = d.lease.token;
    let delivered = format!("attempt 1, token {token}, consumer 2");
    let retried = format!("attempt 1, token {token}, flaky");
    assert_eq!(
        events,
        [
            ("produced", ""),
            ("delivered", delivered.as_str()),
            ("retried", retried.as_str())
        ],
        "{detail}"
    );

    // The settle gives the channel a hold time, where no handler of this process is timed.
    let (_, overview) = call(addr, "GET", "/api/overview", admin, None).await;
    let latency = &row(&overview, ORDERS)["latency"];
    assert_eq!(latency["measured"], "lease", "{latency}");
    assert!(
        latency["p95_ms"].as_f64() >= latency["p50_ms"].as_f64(),
        "{latency}"
    );
    assert!(
        row(&overview, MAIL)["latency"].is_null(),
        "no settle seen on dash/mail yet"
    );

    let (_, dead) = call(addr, "GET", "/api/dead?channel=dash/mail", admin, None).await;
    assert_eq!(dead["total"], 3);
    let groups = dead["groups"].as_array().unwrap();
    assert_eq!(groups[0]["error"], "smtp down (attempt 1 of 1)");
    assert_eq!(groups[0]["count"], 2);
    assert_eq!(groups[1]["error"], "bad address (attempt 1 of 1)");
    let smtp = groups[0]["ids"].clone();
    let body = json!({ "channel": MAIL, "ids": smtp });
    let (_, moved) = call(addr, "POST", "/api/redrive", admin, Some(body)).await;
    assert_eq!(moved, json!({ "moved": 2 }));
    let bad = groups[1]["ids"].clone();
    let body = json!({ "channel": MAIL, "ids": bad });
    let (_, purged) = call(addr, "POST", "/api/purge_dead", admin, Some(body)).await;
    assert_eq!(purged, json!({ "purged": 1 }));
    let (_, overview) = call(addr, "GET", "/api/overview", admin, None).await;
    let m = row(&overview, MAIL);
    assert_eq!(
        (m["ready"].as_u64(), m["dead"].as_u64()),
        (Some(2), Some(0))
    );

    let body = json!({ "channel": ORDERS, "payload": { "n": 99 }, "priority": 3 });
    let (status, produced) = call(addr, "POST", "/api/produce", admin, Some(body)).await;
    assert_eq!(status, 200, "{produced}");
    let (_, list) = call(
        addr,
        "GET",
        "/api/messages?channel=dash/orders",
        admin,
        None,
    )
    .await;
    assert_eq!(
        list["messages"][0]["payload"],
        json!({"n": 99}),
        "priority 3 leaves first"
    );
    assert_eq!(list["messages"][0]["id"], produced["id"]);

    let body = json!({ "channel": ORDERS, "id": first });
    let (_, cancelled) = call(addr, "POST", "/api/cancel", admin, Some(body)).await;
    assert_eq!(cancelled, json!({ "cancelled": "pending" }));
    let body = json!({ "channel": ORDERS });
    call(addr, "POST", "/api/pause", admin, Some(body.clone())).await;
    let (_, overview) = call(addr, "GET", "/api/overview", admin, None).await;
    let o = row(&overview, ORDERS);
    assert_eq!(
        (o["ready"].as_u64(), o["paused"].as_bool()),
        (Some(3), Some(true))
    );
    call(addr, "POST", "/api/resume", admin, Some(body)).await;
    let stats = queue.stats().await.unwrap();
    let o = stats.iter().find(|s| s.channel == ORDERS).unwrap();
    assert!(!o.paused);

    let body = json!({ "channel": ORDERS, "payload": "{not json" });
    let (status, _) = call(addr, "POST", "/api/produce", admin, Some(body)).await;
    assert_eq!(status, 200, "a JSON string is a valid payload");
    let (status, answer) = call(
        addr,
        "GET",
        "/api/message?channel=dash/orders&id=x",
        admin,
        None,
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("not a message id")
    );
}
