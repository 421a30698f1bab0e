//! The emulator's Stream gateway as data (docs/dingtalk.md §8): tickets, connections, messages in
//! flight, acks and the report tests read. `stream` owns what the gateway does with it (the
//! `connections/open` route, the WebSocket listener, delivery and redelivery); `state::Shared`
//! holds one [`Gateway`], so this module imports neither.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    sync::{Mutex, MutexGuard, OnceLock},
    time::Instant,
};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// How the app's events are delivered, as chosen in DingTalk's console (event subscription).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// HTTP push to the registered callback URL (`push`).
    #[default]
    Http,
    /// Over the app's Stream connections.
    Stream,
    /// Both at once: what an organisation may see while it switches from one to the other
    /// (a test reading: the console offers one or the other).
    Both,
}

impl Delivery {
    pub fn uses_http(self) -> bool {
        matches!(self, Delivery::Http | Delivery::Both)
    }

    pub fn uses_stream(self) -> bool {
        matches!(self, Delivery::Stream | Delivery::Both)
    }
}

/// One acknowledgement the gateway received for an `EVENT` message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AckRecord {
    pub message_id: String,
    pub event_id: String,
    pub event_type: String,
    pub connection: u64,
    pub code: i64,
    /// `SUCCESS`, `LATER`, or what else `data.status` said (empty when it said nothing).
    pub status: String,
    /// 0 for the first delivery.
    pub attempt: u32,
    /// Whether it consumed the message (code 200, not `LATER`).
    pub consumed: bool,
    /// From sending the message to receiving this ack, in microseconds.
    pub after_us: u64,
}

/// What happened to the app's Stream connections and messages, for tests.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StreamReport {
    pub tickets_issued: u64,
    pub tickets_refused: u64,
    pub opens_refused: u64,
    pub connections_opened: u64,
    /// Connections open now (id, whether it still receives new messages).
    pub connections: Vec<(u64, bool)>,
    pub deliveries: u64,
    pub redeliveries: u64,
    pub in_flight: usize,
    pub waiting: usize,
    pub given_up: u64,
    pub over_allowance: u64,
    pub pings_sent: u64,
    pub pings_answered: u64,
    pub pings_answered_wrong: u64,
    /// Acks naming no message in flight (late, duplicated, or for a `disconnect`).
    pub stray_acks: u64,
    pub unreadable_frames: u64,
}

/// A test's look at each ack before the gateway acts on it: the gateway waits for the reply.
pub type AckHook = mpsc::UnboundedSender<(AckRecord, oneshot::Sender<()>)>;

/// What the connection task is told to do.
pub(crate) enum Out {
    Frame(String),
    Close,
    Drop,
    Silence,
}

pub(crate) struct Conn {
    pub(crate) tx: mpsc::UnboundedSender<Out>,
    /// False after `disconnect`.
    pub(crate) accepting: bool,
    /// Subscribed to `EVENT` when it opened.
    pub(crate) events: bool,
    pub(crate) unacked: usize,
    pub(crate) close_at: Option<Instant>,
}

/// One event to deliver (all attempts share it).
#[derive(Clone)]
pub(crate) struct Message {
    pub(crate) event_id: String,
    pub(crate) event_type: String,
    pub(crate) data: String,
    pub(crate) born_ms: i64,
    pub(crate) corp_id: String,
    pub(crate) attempt: u32,
}

pub(crate) struct Pending {
    pub(crate) message: Message,
    pub(crate) conn: u64,
    pub(crate) due: Instant,
    pub(crate) sent_at: Instant,
}

#[derive(Default)]
pub(crate) struct GatewayState {
    pub(crate) delivery: Delivery,
    pub(crate) tickets: HashMap<String, Instant>,
    pub(crate) next_conn: u64,
    pub(crate) next_message: u64,
    pub(crate) conns: BTreeMap<u64, Conn>,
    pub(crate) pending: HashMap<String, Pending>,
    /// Ping message id → its `data`.
    pub(crate) pings: HashMap<String, Value>,
    pub(crate) waiting: VecDeque<Message>,
    pub(crate) later: Vec<(Instant, Message)>,
    pub(crate) acks: Vec<AckRecord>,
    /// Messages given up after the last redelivery, as flat events (what DingTalk lost).
    pub(crate) given_up: Vec<Value>,
    pub(crate) ack_hook: Option<AckHook>,
    pub(crate) report: StreamReport,
}

/// The gateway: its state and the WebSocket listener's address.
pub(crate) struct Gateway {
    pub(crate) state: Mutex<GatewayState>,
    pub(crate) rng: Mutex<StdRng>,
    pub(crate) addr: OnceLock<SocketAddr>,
}

impl Gateway {
    pub fn new(delivery: Delivery, seed: u64) -> Gateway {
        Gateway {
            state: Mutex::new(GatewayState {
                delivery,
                ..GatewayState::default()
            }),
            rng: Mutex::new(StdRng::seed_from_u64(seed ^ 0x5eed_57ea_0000_0003)),
            addr: OnceLock::new(),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, GatewayState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn random_hex(&self, bytes: usize) -> String {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        (0..bytes)
            .map(|_| format!("{:02x}", rng.random::<u8>()))
            .collect()
    }

    pub fn delivery(&self) -> Delivery {
        self.state().delivery
    }

    pub fn set_delivery(&self, delivery: Delivery) {
        self.state().delivery = delivery;
    }

    pub fn set_ack_hook(&self, hook: Option<AckHook>) {
        self.state().ack_hook = hook;
    }

    pub fn acks(&self) -> Vec<AckRecord> {
        self.state().acks.clone()
    }

    pub fn given_up(&self) -> Vec<Value> {
        self.state().given_up.clone()
    }

    pub fn report(&self) -> StreamReport {
        let state = self.state();
        let mut report = state.report.clone();
        report.connections = state
            .conns
            .iter()
            .map(|(id, c)| (*id, c.accepting))
            .collect();
        report.in_flight = state.pending.len();
        report.waiting = state.waiting.len() + state.later.len();
        report
    }

    /// Sends `out` to the chosen connections (`None`: all); how many got it.
    pub(crate) fn tell(&self, connection: Option<u64>, out: impl Fn() -> Out) -> usize {
        let state = self.state();
        let mut told = 0;
        for (id, conn) in &state.conns {
            if connection.is_none_or(|c| c == *id) && conn.tx.send(out()).is_ok() {
                told += 1;
            }
        }
        told
    }
}
