//! Plain-text tables for humans: a header row, left-aligned columns, two spaces apart.

/// A table being built: headers, then rows of the same width.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    /// The table as text, one line per row, trailing spaces trimmed, ending in a newline.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(&format!("{cell:w$}"));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Key-value lines for one object (`field  value`), aligned.
pub fn pairs(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        out.push_str(format!("{k:width$}  {v}").trim_end());
        out.push('\n');
    }
    out
}

/// A cell for an optional value: the value, or `-`.
pub fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let mut t = Table::new(&["ID", "STATUS", "TASK"]);
        t.row(vec!["run_1".into(), "completed".into(), "email".into()]);
        t.row(vec!["run_22".into(), "queued".into()]);
        assert_eq!(
            t.render(),
            "ID      STATUS     TASK\n\
             run_1   completed  email\n\
             run_22  queued\n"
        );
    }

    #[test]
    fn an_empty_table_is_its_header() {
        assert_eq!(Table::new(&["NAME", "READY"]).render(), "NAME  READY\n");
    }

    #[test]
    fn pairs_align() {
        assert_eq!(
            pairs(&[
                ("id", "r1".into()),
                ("status", "queued".into()),
                ("key", String::new())
            ]),
            "id      r1\nstatus  queued\nkey\n"
        );
        assert_eq!(opt(None::<u32>), "-");
        assert_eq!(opt(Some(3)), "3");
    }
}
