//! Crews on their WebSockets: one task per unit that reads the server's frames (stamping each
//! with [`Instant::now`] as it arrives), optionally sends a location fix every second, and
//! records offers and releases on the shared [`OfferBoard`], where scenario code waits for
//! them by incident.
//!
//! A unit's offer for an incident ends in exactly one release: `offer_withdrawn` (taken,
//! expired, cancelled) or, once assigned, `assignment_ended`. When an incident's releases
//! equal its offers, every unit it touched is available again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::Message;

use super::fixtures::Unit;
use crate::sim::client::{Api, Ws};
use crate::sim::rng::SimRng;

/// One offer as a crew saw it.
#[derive(Clone, Debug)]
pub struct Offered {
    /// Index of the unit in the scenario's unit list.
    pub unit: usize,
    /// The offer id.
    pub offer_id: String,
}

/// What the crews saw of one incident.
#[derive(Debug, Default)]
pub struct TrackState {
    /// When the first offer frame arrived.
    pub first_offer_at: Option<Instant>,
    /// Every offer frame, in arrival order.
    pub offers: Vec<Offered>,
    /// Offers that ended (withdrawn, or the assignment they led to ended).
    pub released: usize,
}

/// One incident's track, with a wake-up for its waiter.
#[derive(Debug, Default)]
pub struct Track {
    state: Mutex<TrackState>,
    changed: Notify,
}

impl Track {
    fn update(&self, f: impl FnOnce(&mut TrackState)) {
        f(&mut lock(&self.state));
        self.changed.notify_one();
    }

    /// Waits until `done` holds for the track, at most `timeout`; returns whether it held.
    /// One waiter per track (the wake-up is a single permit).
    pub async fn wait(&self, timeout: Duration, done: impl Fn(&TrackState) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&lock(&self.state)) {
                return true;
            }
            if tokio::time::timeout_at(deadline, self.changed.notified())
                .await
                .is_err()
            {
                return done(&lock(&self.state));
            }
        }
    }

    /// Reads the track.
    pub fn read<T>(&self, f: impl FnOnce(&TrackState) -> T) -> T {
        f(&lock(&self.state))
    }
}

/// Offers and releases by incident id.
#[derive(Debug, Default)]
pub struct OfferBoard {
    incidents: Mutex<HashMap<String, Arc<Track>>>,
    errors: std::sync::atomic::AtomicU64,
}

impl OfferBoard {
    /// The track of `incident` (created empty when none yet).
    pub fn track(&self, incident: &str) -> Arc<Track> {
        lock(&self.incidents)
            .entry(incident.to_owned())
            .or_default()
            .clone()
    }

    /// Forgets an incident the scenario is done with.
    pub fn forget(&self, incident: &str) {
        lock(&self.incidents).remove(incident);
    }

    /// `error` frames and broken sockets seen so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn error(&self) {
        self.errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The crews' sessions; [`Crews::close`] ends them with a close frame.
#[derive(Debug)]
pub struct Crews {
    /// Offers and releases.
    pub board: Arc<OfferBoard>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Crews {
    /// Opens a crew WebSocket for every unit (at most `concurrency` handshakes at once). With
    /// `locate`, each crew sends a location fix near its base every second (first one after a
    /// random part of a second, so the fleet's fixes are spread evenly).
    pub async fn connect(
        api: &Api,
        units: &[Unit],
        locate: bool,
        concurrency: usize,
        rng: &mut SimRng,
    ) -> anyhow::Result<Self> {
        let sockets: Vec<(usize, Ws)> = futures_util::stream::iter(units.iter().enumerate())
            .map(|(i, unit)| {
                let api = api.with_token(&unit.crew_token);
                async move {
                    let ws = api
                        .ws("/api/v1/ws/crew")
                        .await
                        .with_context(|| format!("crew WebSocket of {}", unit.id))?;
                    anyhow::Ok((i, ws))
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
        let board = Arc::new(OfferBoard::default());
        let (stop, stop_rx) = watch::channel(false);
        let tasks = sockets
            .into_iter()
            .map(|(i, ws)| {
                let session = Session {
                    unit: i,
                    board: board.clone(),
                    home: units[i].home,
                    locate,
                    rng: SimRng::new(rng.next_u64()),
                    pending: None,
                    assigned: None,
                };
                tokio::spawn(session.run(ws, stop_rx.clone()))
            })
            .collect();
        Ok(Self { board, stop, tasks })
    }

    /// Closes every session and waits for them.
    pub async fn close(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The fields loadgen reads from a crew frame.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default, borrow)]
    offer_id: Option<&'a str>,
    #[serde(default, borrow)]
    incident_id: Option<&'a str>,
}

struct Session {
    unit: usize,
    board: Arc<OfferBoard>,
    home: super::fixtures::Point,
    locate: bool,
    rng: SimRng,
    /// (offer, incident) pending for this unit.
    pending: Option<(String, String)>,
    /// The incident this unit is assigned to.
    assigned: Option<String>,
}

impl Session {
    async fn run(mut self, ws: Ws, mut stop: watch::Receiver<bool>) {
        let (mut sink, mut stream) = ws.split();
        let phase = Duration::from_secs_f64(self.rng.range(0.0, 1.0));
        let mut fixes =
            tokio::time::interval_at(tokio::time::Instant::now() + phase, Duration::from_secs(1));
        fixes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                frame = stream.next() => match frame {
                    Some(Ok(Message::Text(text))) => self.on_frame(Instant::now(), text.as_str()),
                    Some(Ok(Message::Close(_))) | None => {
                        if !*stop.borrow() {
                            self.board.error();
                        }
                        return;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) => {
                        self.board.error();
                        return;
                    }
                },
                _ = fixes.tick(), if self.locate => {
                    let at = self.home.offset_km(self.rng.range(-0.05, 0.05), self.rng.range(-0.05, 0.05));
                    let text = format!(r#"{{"type":"location","lat":{:.6},"lng":{:.6}}}"#, at.lat, at.lng);
                    if sink.send(Message::text(text)).await.is_err() {
                        self.board.error();
                        return;
                    }
                }
                _ = stop.changed() => {
                    let _ = sink.send(Message::Close(None)).await;
                    return;
                }
            }
        }
    }

    fn on_frame(&mut self, at: Instant, text: &str) {
        let Ok(frame) = serde_json::from_str::<Frame<'_>>(text) else {
            self.board.error();
            return;
        };
        match frame.kind {
            "offer" => {
                let (Some(offer), Some(incident)) = (frame.offer_id, frame.incident_id) else {
                    self.board.error();
                    return;
                };
                let unit = self.unit;
                self.board.track(incident).update(|s| {
                    s.first_offer_at.get_or_insert(at);
                    s.offers.push(Offered {
                        unit,
                        offer_id: offer.to_owned(),
                    });
                });
                self.pending = Some((offer.to_owned(), incident.to_owned()));
            }
            "offer_withdrawn" => {
                if let Some((offer, incident)) = self.pending.take() {
                    if frame.offer_id == Some(offer.as_str()) {
                        self.board.track(&incident).update(|s| s.released += 1);
                    } else {
                        self.pending = Some((offer, incident));
                    }
                }
            }
            "assigned" => {
                let Some(incident) = frame.incident_id else {
                    return;
                };
                if self
                    .pending
                    .as_ref()
                    .is_some_and(|(_, i)| i.as_str() == incident)
                {
                    self.pending = None;
                }
                self.assigned = Some(incident.to_owned());
            }
            "assignment_ended" => {
                if let Some(incident) = self.assigned.take() {
                    if frame.incident_id == Some(incident.as_str()) {
                        self.board.track(&incident).update(|s| s.released += 1);
                    } else {
                        self.assigned = Some(incident);
                    }
                }
            }
            "error" => self.board.error(),
            // location_ack, accept_result, decline_result, status_result, heartbeats …
            _ => {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
