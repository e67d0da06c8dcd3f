//! The admin UI's HTML, server-rendered with maud (every value escaped), one stylesheet, no
//! script.

use maud::{DOCTYPE, Markup, html};

use super::chart::Sample;

/// A whole page: the navigation (when logged in), a message, the body.
pub fn page(
    title: &str,
    nav: Option<(&str, &str)>,
    notice: Option<&Notice>,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · auth-sidecar" }
                link rel="stylesheet" href="/admin.css";
            }
            body {
                header {
                    span.brand { "auth-sidecar" }
                    @if let Some((user, csrf)) = nav {
                        nav {
                            a href="/" { "Overview" }
                            a href="/subject" { "Subjects" }
                            a href="/token" { "Token inspector" }
                            a href="/limits" { "Rate limits" }
                        }
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(csrf);
                            span.user { (user) }
                            button type="submit" id="logout" { "Log out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    @if let Some(n) = notice {
                        p class=(n.class()) id="notice" { (n.text()) }
                    }
                    (body)
                }
            }
        }
    }
}

/// A message above the page's body.
pub enum Notice {
    Done(String),
    Problem(String),
}

impl Notice {
    fn class(&self) -> &'static str {
        match self {
            Notice::Done(_) => "notice done",
            Notice::Problem(_) => "notice problem",
        }
    }

    fn text(&self) -> &str {
        match self {
            Notice::Done(t) | Notice::Problem(t) => t,
        }
    }
}

/// The login form; `enabled` false says how to turn the UI on instead.
pub fn login(enabled: bool, csrf: &str) -> Markup {
    html! {
        @if enabled {
            form.card method="post" action="/login" {
                input type="hidden" name="csrf" value=(csrf);
                label { "User name" input type="text" name="username" id="username" autocomplete="username" required; }
                label { "Password" input type="password" name="password" id="password" autocomplete="current-password" required; }
                button type="submit" id="login" { "Log in" }
            }
        } @else {
            div.card {
                p { "The admin UI is off: no password is set." }
                p {
                    "Set " code { "ADMIN_GUI_PASSWORD_HASH" } " (an Argon2id PHC string) or "
                    code { "ADMIN_GUI_PASSWORD" } " on every node, the same on each, and "
                    code { "ADMIN_GUI_USERNAME" } " if not " code { "admin" } "."
                }
            }
        }
    }
}

/// A small line chart of the samples: calls, and validations that failed, per interval.
pub fn chart(samples: &[Sample]) -> Markup {
    const W: f64 = 480.0;
    const H: f64 = 80.0;
    if samples.len() < 2 {
        return html! {
            p.hint id="chart-empty" { "No samples yet: the chart adds one every 10 s; reload to see it." }
        };
    }
    let peak = samples
        .iter()
        .map(|s| s.calls.max(s.invalid))
        .max()
        .unwrap_or(0);
    let max = peak.max(1) as f64;
    let points = |value: fn(&Sample) -> u64| {
        let n = samples.len().max(2) - 1;
        samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let x = W * i as f64 / n as f64;
                let y = H - H * value(s) as f64 / max;
                format!("{x:.1},{y:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    html! {
        figure.chart {
            svg viewBox="0 0 480 80" width="480" height="80" role="img" aria-label="Calls and failed validations per 10 seconds" {
                polyline points=(points(|s| s.calls)) fill="none" stroke="#3b6ea5" stroke-width="2" {}
                polyline points=(points(|s| s.invalid)) fill="none" stroke="#b5533c" stroke-width="2" {}
            }
            figcaption {
                span.calls { "calls" } " and " span.invalid { "failed validations" }
                " per 10 s, last " (samples.len() * 10 / 60) " min; peak " (peak)
            }
        }
    }
}
