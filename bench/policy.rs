//! Policy decisions, in process: one `tools/call` decision (inputs built, the set chosen by
//! server and tool, Cedar's authorization) with 1,000 policies loaded, against the same
//! decision with the 3 policies the request needs, in the same run.
//!
//! ```text
//! cargo bench --bench policy                   # 200,000 decisions per case
//! POLICY_DECISIONS=50000 cargo bench --bench policy
//! ```
//!
//! The 1,000 policies are 50 servers × 20 tools, each a `permit` for one group with an
//! argument rule, bound to its server and tool the way docs/policy.md recommends, plus a few
//! unbound ones (a `forbid` on a secret argument, working hours) that every decision
//! evaluates. Printed: p50, p99 and mean in µs per decision, and the ratio to the small set.

use std::time::Instant;

use portcullis::authn::{Principal, PrincipalKind};
use portcullis::policy::{Act, Args, Ask, Engine};
use serde_json::json;

fn policies(servers: usize, tools: usize) -> String {
    let mut text = String::new();
    for s in 0..servers {
        for t in 0..tools {
            text.push_str(&format!(
                "permit(principal in Portcullis::Group::\"g{s}\", action == Portcullis::Action::\"call_tool\", resource)\n\
                 when {{ resource.server == \"s{s}\" && resource.name == \"t{t}\" && context.args.repo like \"acme/*\" }};\n"
            ));
        }
    }
    text.push_str(
        "forbid(principal, action == Portcullis::Action::\"call_tool\", resource)\n\
         when { context.args has repo && context.args.repo like \"*secret*\" };\n\
         forbid(principal, action == Portcullis::Action::\"call_tool\", resource)\n\
         unless { context.time.weekday <= 7 };\n",
    );
    text
}

fn measure(engine: &Engine, n: usize) -> (f64, f64, f64) {
    let principal = Principal {
        id: "id-alice".into(),
        name: "alice".into(),
        kind: PrincipalKind::User,
        groups: vec!["g7".into(), "staff".into()],
        token_id: Some("t".into()),
        servers: None,
    };
    let args = json!({"repo": "acme/widgets", "title": "a bug", "labels": ["x", "y"], "priority": 2});
    let servers: Vec<String> = (0..50).map(|s| format!("s{s}")).collect();
    let ask = Ask {
        principal: &principal,
        server: "s7",
        trusted: false,
        act: Act::CallTool { name: "t3", args: Args::Known(Some(&args)), annotations: None },
        client: Some(("bench", "1")),
        servers: &servers,
        now_ms: 1_796_601_600_000,
    };
    assert!(engine.decide(&ask).allowed, "the bench's decision allows");
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let d = engine.decide(&ask);
        samples.push(t.elapsed().as_nanos() as f64 / 1000.0);
        std::hint::black_box(d);
    }
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / n as f64;
    (samples[n / 2], samples[n * 99 / 100], mean)
}

fn main() {
    let n: usize = std::env::var("POLICY_DECISIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let big = Engine::load(&[("bench.cedar".into(), policies(50, 20))], 0).expect("loads");
    let small = Engine::load(
        &[("bench.cedar".into(), policies(1, 1).replace("g0", "g7").replace("s0", "s7").replace("t0", "t3"))],
        0,
    )
    .expect("loads");
    println!("policy: {n} decisions per case; {} and {} policies loaded", big.count, small.count);
    // Alternate so that both see the same machine.
    let (mut b, mut s) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        s.push(measure(&small, n / 3));
        b.push(measure(&big, n / 3));
    }
    let median = |v: &mut Vec<(f64, f64, f64)>, f: fn(&(f64, f64, f64)) -> f64| {
        let mut xs: Vec<f64> = v.iter().map(f).collect();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let (sp50, sp99, smean) = (median(&mut s, |x| x.0), median(&mut s, |x| x.1), median(&mut s, |x| x.2));
    let (bp50, bp99, bmean) = (median(&mut b, |x| x.0), median(&mut b, |x| x.1), median(&mut b, |x| x.2));
    println!("  {:>6} policies: p50 {sp50:6.2} µs  p99 {sp99:6.2} µs  mean {smean:6.2} µs", small.count);
    println!("  {:>6} policies: p50 {bp50:6.2} µs  p99 {bp99:6.2} µs  mean {bmean:6.2} µs", big.count);
    println!(
        "{}",
        json!({"decisions": n, "small": {"policies": small.count, "p50_us": sp50, "p99_us": sp99, "mean_us": smean},
               "big": {"policies": big.count, "p50_us": bp50, "p99_us": bp99, "mean_us": bmean},
               "p99_ratio": bp99 / sp99})
    );
}
