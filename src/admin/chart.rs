//! The overview's live chart: every 10 s, the change in the calls and in the failed
//! validations this node has counted, read from the metrics it already keeps; the last
//! 5 minutes.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const INTERVAL: Duration = Duration::from_secs(10);
const SAMPLES: usize = 30;

#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub calls: u64,
    pub invalid: u64,
}

#[derive(Clone, Default)]
pub struct Chart {
    samples: Arc<Mutex<VecDeque<Sample>>>,
}

impl Chart {
    /// Starts sampling in the background.
    pub fn start() -> Chart {
        let chart = Chart::default();
        let samples = chart.samples.clone();
        tokio::spawn(async move {
            let mut last = totals();
            loop {
                tokio::time::sleep(INTERVAL).await;
                let now = totals();
                let mut samples = samples.lock().unwrap_or_else(|e| e.into_inner());
                if samples.len() == SAMPLES {
                    samples.pop_front();
                }
                samples.push_back(Sample {
                    calls: now.calls.saturating_sub(last.calls),
                    invalid: now.invalid.saturating_sub(last.invalid),
                });
                last = now;
            }
        });
        chart
    }

    pub fn samples(&self) -> Vec<Sample> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.iter().copied().collect()
    }
}

/// The counters so far, from the Prometheus text the recorder renders.
fn totals() -> Sample {
    let text = crate::telemetry::metrics().render();
    let sum = |name: &str, keep: &dyn Fn(&str) -> bool| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name) && keep(l))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    Sample {
        calls: sum("authsidecar_rpc_requests_total{", &|_| true),
        invalid: sum("authsidecar_validations_total{", &|l| {
            !l.contains("result=\"valid\"")
        }),
    }
}
