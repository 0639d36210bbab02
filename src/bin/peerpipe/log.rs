//! A minimal `tracing` subscriber for `--verbose`: info and above, one line per event on
//! stderr (the workspace has no subscriber crate; this is all the commands need).

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::{span, Event, Level, Metadata, Subscriber};

struct Stderr;

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value}");
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl Subscriber for Stderr {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        *m.level() <= Level::INFO
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, e: &Event<'_>) {
        let mut line = Line(format!(
            "{} {}:",
            e.metadata().level(),
            e.metadata().target()
        ));
        e.record(&mut line);
        eprintln!("{}", line.0);
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

/// Sends info-level events and above to stderr (once; later calls do nothing).
pub fn init() {
    let _ = tracing::subscriber::set_global_default(Stderr);
}
