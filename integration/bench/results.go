package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// metric is one figure of the table. Ratios are to the direct contender:
// for rates higher is better, for latencies lower is better; absolute
// figures (memory, set-up, loss) have no direct counterpart or no meaningful ratio.
type metric struct {
	key, label, unit string
	ratio            bool
}

func metrics(cfg config) []metric {
	m := []metric{
		{"tcp_h2c_1", "TCP host→child, 1 stream", "Gbit/s", true},
		{"tcp_h2c_4", "TCP host→child, 4 streams", "Gbit/s", true},
		{"tcp_c2h_1", "TCP child→host, 1 stream", "Gbit/s", true},
		{"tcp_c2h_4", "TCP child→host, 4 streams", "Gbit/s", true},
		{"conn_1", "short conns/s, 1 client", "1/s", true},
		{"conn_1_p50", "  latency p50, 1 client", "µs", true},
		{"conn_1_p99", "  latency p99, 1 client", "µs", true},
		{"conn_16", "short conns/s, 16 clients", "1/s", true},
		{"conn_16_p50", "  latency p50, 16 clients", "µs", true},
		{"conn_16_p99", "  latency p99, 16 clients", "µs", true},
	}
	for _, rate := range cfg.udpRates {
		m = append(m,
			metric{"udp_" + rate, "UDP received at " + rate + "bit/s offered", "Mbit/s", true},
			metric{"udp_" + rate + "_loss", "  UDP loss at " + rate + "bit/s", "%", false})
	}
	return append(m,
		metric{"udp_rr_p50", "UDP request/reply p50", "µs", true},
		metric{"udp_rr_p99", "UDP request/reply p99", "µs", true},
		metric{"rss_idle", "forwarder RSS idle (4 ports)", "MiB", false},
		metric{"rss_ports", fmt.Sprintf("forwarder RSS, %d ports", cfg.totalPorts), "MiB", false},
		metric{"rss_conns", fmt.Sprintf("forwarder RSS, %d idle conns", cfg.idleConns), "MiB", false},
		metric{"per_conn_kib", "RSS per idle connection", "KiB", false},
		metric{"setup_ms", "publish a port (CLI; pasta: start; cni: ADD)", "ms", false},
		metric{"add_api_ms", "publish a port (API, median)", "ms", false},
	)
}

// results is everything measured, by contender and metric.
type results struct {
	cfg    config
	order  []string
	values map[string]map[string][]float64
	status map[string]string // "" ok, else "skipped: …" / "failed: …"
	notes  map[string][]string
	procs  map[string][]string
	peer   map[string]bool // clients in a veth peer netns
	took   time.Duration
}

func newResults(cfg config) *results {
	return &results{cfg: cfg, values: map[string]map[string][]float64{}, status: map[string]string{},
		notes: map[string][]string{}, procs: map[string][]string{}, peer: map[string]bool{}}
}

func (r *results) seen(name string) {
	if _, ok := r.values[name]; !ok {
		r.values[name] = map[string][]float64{}
		r.order = append(r.order, name)
	}
}

func (r *results) add(name, key string, v float64) {
	r.seen(name)
	r.values[name][key] = append(r.values[name][key], v)
}

func (r *results) skip(name, why string) { r.seen(name); r.status[name] = "skipped: " + why }

// fail records a run that failed; the contender counts as failed only if no
// run gave a figure.
func (r *results) fail(name, why string) { r.note(name, "run failed: "+why) }

// ok reports whether name has figures to show.
func (r *results) ok(name string) bool { return r.status[name] == "" && len(r.values[name]) > 0 }
func (r *results) note(name, what string) {
	r.seen(name)
	r.notes[name] = append(r.notes[name], what)
}

// summary is the median and range of one figure's runs.
type summary struct {
	Runs   []float64 `json:"runs"`
	Median float64   `json:"median"`
	Min    float64   `json:"min"`
	Max    float64   `json:"max"`
	// Ratio is median / direct's median, when the metric has one.
	Ratio    float64 `json:"ratio,omitempty"`
	RatioMin float64 `json:"ratioMin,omitempty"`
	RatioMax float64 `json:"ratioMax,omitempty"`
}

func summarize(v []float64) (summary, bool) {
	if len(v) == 0 {
		return summary{}, false
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return summary{Runs: v, Median: med, Min: s[0], Max: s[len(s)-1]}, true
}

// baseline is the direct contender whose clients sit where name's do.
func (r *results) baseline(name string) string {
	if r.peer[name] {
		return "direct-peer"
	}
	return "direct"
}

func (r *results) summaries() map[string]map[string]summary {
	out := map[string]map[string]summary{}
	for _, name := range r.order {
		out[name] = map[string]summary{}
		for _, m := range metrics(r.cfg) {
			s, ok := summarize(r.values[name][m.key])
			if !ok {
				continue
			}
			if d, ok := summarize(r.values[r.baseline(name)][m.key]); ok && m.ratio && d.Median > 0 {
				s.Ratio, s.RatioMin, s.RatioMax = s.Median/d.Median, s.Min/d.Median, s.Max/d.Median
			}
			out[name][m.key] = s
		}
	}
	return out
}

// write prints the table to w and writes results.json, table.txt and chart.png to dir.
func (r *results) write(dir string, w io.Writer) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	sums := r.summaries()
	var table strings.Builder
	r.table(&table, sums)
	fmt.Fprint(w, table.String())
	if err := os.WriteFile(filepath.Join(dir, "table.txt"), []byte(table.String()), 0o644); err != nil {
		return err
	}

	type contenderJSON struct {
		Status    string             `json:"status"`
		Notes     []string           `json:"notes,omitempty"`
		Processes []string           `json:"processes,omitempty"`
		Baseline  string             `json:"baseline"`
		Metrics   map[string]summary `json:"metrics"`
	}
	doc := struct {
		Date       string                   `json:"date"`
		Machine    map[string]string        `json:"machine"`
		Quick      bool                     `json:"quick"`
		Runs       int                      `json:"runs"`
		Took       string                   `json:"took"`
		Units      map[string]string        `json:"units"`
		Contenders map[string]contenderJSON `json:"contenders"`
		Order      []string                 `json:"order"`
	}{Date: time.Now().UTC().Format(time.RFC3339), Machine: machine(), Quick: r.cfg.quick, Runs: r.cfg.runs,
		Took: r.took.Round(time.Second).String(), Units: map[string]string{}, Contenders: map[string]contenderJSON{}, Order: r.order}
	for _, m := range metrics(r.cfg) {
		doc.Units[m.key] = m.unit
	}
	for _, name := range r.order {
		st := r.status[name]
		if st == "" && r.ok(name) {
			st = "ok"
		} else if st == "" {
			st = "failed"
		}
		doc.Contenders[name] = contenderJSON{Status: st, Notes: r.notes[name], Processes: r.procs[name],
			Baseline: r.baseline(name), Metrics: sums[name]}
	}
	js, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), append(js, '\n'), 0o644); err != nil {
		return err
	}
	chart := filepath.Join(dir, "chart.png")
	if err := r.chart(chart, sums); err != nil {
		return fmt.Errorf("chart %s: %w", chart, err)
	}
	fmt.Fprintf(w, "\nresults: %s, %s, %s\n", filepath.Join(dir, "results.json"), filepath.Join(dir, "table.txt"), chart)
	return nil
}

// table: one row per metric, one column per contender; ratio metrics show
// median ratio to direct (min–max over runs), others their absolute median.
func (r *results) table(w io.Writer, sums map[string]map[string]summary) {
	var cols []string
	for _, name := range r.order {
		if r.ok(name) {
			cols = append(cols, name)
		}
	}
	m := machine()
	fmt.Fprintf(w, "portkit-bench %s, %s, %s CPUs, kernel %s; %d run(s), median (min–max); took %s\n",
		time.Now().Format("2006-01-02"), m["cpu"], m["cpus"], m["kernel"], r.cfg.runs, r.took.Round(time.Second))
	fmt.Fprintln(w, "direct columns are absolute; other columns are ratios to direct (to direct-peer for contenders whose clients come from a veth peer), except rows marked [abs]")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(w, "")
	fmt.Fprintf(tw, "metric\tunit\t%s\t\n", strings.Join(cols, "\t"))
	for _, mt := range metrics(r.cfg) {
		label := mt.label
		if !mt.ratio {
			label += " [abs]"
		}
		row := []string{label, mt.unit}
		any := false
		for _, name := range cols {
			s, ok := sums[name][mt.key]
			switch {
			case !ok:
				row = append(row, "-")
				continue
			case mt.ratio && s.Ratio > 0 && r.baseline(name) != name:
				row = append(row, rangeText(s.Ratio, s.RatioMin, s.RatioMax, r.cfg.runs))
			default:
				row = append(row, rangeText(s.Median, s.Min, s.Max, r.cfg.runs))
			}
			any = true
		}
		if any {
			fmt.Fprintf(tw, "%s\t\n", strings.Join(row, "\t"))
		}
	}
	tw.Flush()
	for _, name := range r.order {
		if st := r.status[name]; st != "" {
			fmt.Fprintf(w, "%s: %s\n", name, st)
		} else if !r.ok(name) {
			fmt.Fprintf(w, "%s: failed in every run\n", name)
		}
		for _, n := range r.notes[name] {
			fmt.Fprintf(w, "%s: note: %s\n", name, n)
		}
	}
}

func rangeText(med, lo, hi float64, runs int) string {
	if runs < 2 {
		return num(med)
	}
	return fmt.Sprintf("%s (%s–%s)", num(med), num(lo), num(hi))
}

func num(v float64) string {
	switch a := v; {
	case a >= 1000:
		return fmt.Sprintf("%.0f", v)
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

// machine names where the figures come from.
func machine() map[string]string {
	m := map[string]string{"cpus": fmt.Sprint(runtime.NumCPU()), "go": runtime.Version()}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m["kernel"] = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m["cpu"] = strings.TrimSpace(v)
				break
			}
		}
	}
	if h, err := os.Hostname(); err == nil {
		m["hostname"] = h
	}
	for _, v := range []struct{ key, cmd, arg string }{
		{"rootlesskit", "rootlesskit", "--version"}, {"slirp4netns", "slirp4netns", "--version"},
		{"iperf3", "iperf3", "--version"},
	} {
		if out, err := exec.Command(v.cmd, v.arg).Output(); err == nil {
			m[v.key] = strings.SplitN(strings.TrimSpace(string(out)), "\n", 2)[0]
		}
	}
	return m
}
