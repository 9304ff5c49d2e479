//! Figures, their JSON lines, and the text sections each workload renders.

use std::io::Write as _;

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub workload: &'static str,
    pub engine: &'static str,
    pub metric: &'static str,
    pub value: f64,
}

/// Collects figures (printed at once as JSON lines in `--json` mode, so a
/// later failure keeps earlier ones) and the workloads' table sections.
#[derive(Debug)]
pub struct Report {
    json: bool,
    figures: Vec<Figure>,
    sections: Vec<String>,
}

impl Report {
    pub fn new(json: bool) -> Self {
        Self {
            json,
            figures: Vec::new(),
            sections: Vec::new(),
        }
    }

    pub fn record(
        &mut self,
        workload: &'static str,
        engine: &'static str,
        metric: &'static str,
        value: f64,
    ) {
        let figure = Figure {
            workload,
            engine,
            metric,
            value,
        };
        if self.json {
            match serde_json::to_string(&figure) {
                Ok(line) => {
                    println!("{line}");
                    let _ = std::io::stdout().flush();
                }
                Err(e) => eprintln!("aragora-bench: cannot encode {figure:?}: {e}"),
            }
        }
        self.figures.push(figure);
    }

    pub fn section(&mut self, text: String) {
        self.sections.push(text);
    }

    pub fn render(&self) -> String {
        self.sections.join("\n")
    }
}

/// 1234567.8 -> "1,234,568".
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1_000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
    }
}
