//! Start-up with `--packet-state-dir`: taking over the promoted tunnels a
//! previous process left in the pinned maps (see `handover.rs`).

use std::sync::{atomic::Ordering, Arc};

use super::{
    handover::{self, Found},
    translate::entry_end,
    tunnel::{flow_end, translated, Addrs, Registration, Shared, Translated},
};
use crate::dataplane::{AdoptedContext, AdoptedTunnel, LimitClock};

/// Sorts what the pinned maps hold: removes the flows that were not
/// translating, reserves the 4-tuples of the others and returns them, ready
/// to be followed. Also moves `next_flow` past every id in use.
pub fn adopt(shared: &Arc<Shared>) -> Vec<AdoptedTunnel> {
    let Some(tunnels) = &shared.tunnels else {
        return Vec::new();
    };
    let entries = shared.kernel.all_entries();
    let ids = tunnels.ids();
    let highest = entries
        .iter()
        .map(|(_, entry)| entry.flow_id)
        .chain(ids.iter().copied())
        .max()
        .unwrap_or(0);
    shared.next_flow.fetch_max(highest + 1, Ordering::Relaxed);
    let found = handover::plan(
        &entries,
        |flow_id| tunnels.get(flow_id).map(|value| value.client_key),
        |a, b| flow_end(entry_end(a), entry_end(b)).is_some(),
    );
    // Values whose entries never made it into the map (the previous process
    // stopped between the two inserts).
    for id in &ids {
        if !entries.iter().any(|(_, entry)| entry.flow_id == *id) {
            tunnels.remove(*id);
        }
    }
    let mut adopted = Vec::new();
    let (mut removed, mut lingering) = (0, 0);
    for found in found {
        match found {
            Found::Remove { flow_id, keys } => {
                for key in &keys {
                    shared.kernel.remove(key);
                }
                tunnels.remove(flow_id);
                removed += 1;
            }
            Found::Adopt {
                flow_id,
                keys,
                ended,
                logged,
            } => {
                let sockets = match (handover::reserve(&keys[0]), handover::reserve(&keys[1])) {
                    (Ok(client), Ok(upstream)) => (client, upstream),
                    (Err(err), _) | (_, Err(err)) => {
                        // Another socket took a 4-tuple in the gap between
                        // the processes: its segments would be translated
                        // into the tunnel. The flow ends (its endpoints get
                        // RSTs from this host when they next send).
                        log::warn!(
                            "packet plane: flow {flow_id} ({:?} ⇄ {:?}) not adopted: its 4-tuple is taken ({err})",
                            handover::ends(&keys[0]).1,
                            handover::ends(&keys[1]).1
                        );
                        for key in &keys {
                            shared.kernel.remove(key);
                        }
                        tunnels.remove(flow_id);
                        removed += 1;
                        continue;
                    }
                };
                let (registration, events) = Registration::adopt(shared, keys, flow_id);
                if logged {
                    // Ended and logged by the previous process: only the
                    // linger is left.
                    lingering += 1;
                    // The client's tuple is its to reuse (see
                    // `tunnel::translated`).
                    let (client, upstream) = sockets;
                    drop(client);
                    let linger = Box::new((registration, upstream));
                    tokio::spawn(async move {
                        tokio::time::sleep(super::tunnel::LINGER).await;
                        drop(linger);
                    });
                    continue;
                }
                let value = tunnels.get(flow_id);
                let (client_local, client_peer) = handover::ends(&keys[0]);
                let (upstream_local, upstream_peer) = handover::ends(&keys[1]);
                let before = value.map_or([0, 0], |value| value.before);
                let shared = shared.clone();
                log::debug!(
                    "packet plane: adopting flow {flow_id}: {client_peer} → {upstream_peer}{}",
                    if ended { " (ended)" } else { "" }
                );
                adopted.push(AdoptedTunnel {
                    handover: value
                        .map(|value| value.record().to_vec())
                        .unwrap_or_default(),
                    client: (client_peer, client_local),
                    upstream: upstream_peer,
                    before_promotion: before,
                    run: Box::new(move |context: AdoptedContext| {
                        context.progress.note_promotion(before);
                        Box::pin(translated(Translated {
                            shared,
                            registration,
                            events: Some(events),
                            shutdown: context.shutdown,
                            draining: context.draining,
                            clock: LimitClock::start(context.limits),
                            progress: context.progress,
                            before,
                            addrs: Addrs {
                                cookies: [0, 0],
                                client_local,
                                client_peer,
                                upstream_local,
                                upstream_peer,
                            },
                            sockets: [Box::new(sockets.0), Box::new(sockets.1)],
                        }))
                    }),
                });
            }
        }
    }
    shared
        .adopted
        .fetch_add(adopted.len() as u64, Ordering::Relaxed);
    if !adopted.is_empty() || removed > 0 || lingering > 0 {
        log::info!(
            "packet plane: adopted {} promoted tunnels of the previous process ({lingering} more only lingering); removed {removed} flows that were not translating",
            adopted.len()
        );
    }
    adopted
}
