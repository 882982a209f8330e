// Command portkit-bench measures, side by side in one run, each way of
// publishing a port from a child network namespace on host 127.0.0.1 —
// portkit's drivers and their peers from Debian (RootlessKit, slirp4netns,
// pasta) — against direct loopback, and prints one table of ratios to direct.
//
// For each contender it sets up "host 127.0.0.1:P → server in a child netns"
// as the unprivileged user (portkit-test when run as root: rootless is the
// point), starts the servers inside the child (iperf3 -s, and this binary
// re-executed through nsenter as a small request/reply server), measures,
// and tears everything down. Runs alternate between contenders so drift hits
// all alike. Output: the table on stdout, results.json, and chart.png under -out.
//
// BENCH_QUICK=1 is a one-minute smoke run (one run, short durations, a few
// contenders) that `make test` runs so the harness never rots.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/internal/testenv"
)

// config is what one bench run measures and for how long.
type config struct {
	quick      bool
	runs       int
	tcpSecs    int // iperf3 -t takes whole seconds
	udpSecs    int
	udpRates   []string // offered rates, iperf3 -b syntax
	connDur    time.Duration
	rrDur      time.Duration
	idleConns  int
	totalPorts int // ports published for the "100 ports" memory figure
	only       map[string]bool
	out        string
	binDir     string
}

func defaults(quick bool) config {
	if quick {
		return config{quick: true, runs: 1, tcpSecs: 1, udpSecs: 1, udpRates: []string{"1G"},
			connDur: 500 * time.Millisecond, rrDur: 300 * time.Millisecond, idleConns: 100, totalPorts: 20}
	}
	// Sized so 13 contenders × 3 runs fit in under 10 minutes on 2 cores.
	return config{runs: 3, tcpSecs: 1, udpSecs: 1, udpRates: []string{"500M", "2G"},
		connDur: time.Second, rrDur: 500 * time.Millisecond, idleConns: 1000, totalPorts: 100}
}

// Child-side ports of the servers (direct uses the host ports instead).
const (
	iperfPort = 5201
	tcpRRPort = 7000
	udpRRPort = 7001
)

func main() {
	if spec := os.Getenv(serveEnv); spec != "" {
		serveMain()
		return
	}
	quick := os.Getenv("BENCH_QUICK") == "1"
	cfg := defaults(quick)
	flag.StringVar(&cfg.out, "out", "bench-results", "directory for results.json, table.txt and chart.png")
	flag.StringVar(&cfg.binDir, "bin", "bin", "directory holding portkit's built binaries")
	flag.IntVar(&cfg.runs, "runs", cfg.runs, "runs of every measurement per contender (median and min-max are reported)")
	only := flag.String("contenders", "", "comma-separated contenders to run (default: all; BENCH_QUICK: a few)")
	list := flag.Bool("list", false, "list the contenders and exit")
	flag.Parse()
	if *list {
		for _, c := range contenders() {
			fmt.Println(c.name)
		}
		return
	}
	if *only != "" {
		cfg.only = map[string]bool{}
		for _, n := range strings.Split(*only, ",") {
			cfg.only[strings.TrimSpace(n)] = true
		}
	}
	if err := benchMain(cfg); err != nil {
		fmt.Fprintf(os.Stderr, "portkit-bench: %v\n", err)
		os.Exit(1)
	}
}

// bench holds one run's state.
type bench struct {
	cfg     config
	env     *env
	results *results
}

func benchMain(cfg config) error {
	started := time.Now()
	// Orphans of the forwarders we kill are reparented to us and reaped;
	// PID 1 on these machines reaps nothing.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl PR_SET_CHILD_SUBREAPER: %w", err)
	}
	for _, p := range []string{"iperf3", "nsenter", "unshare"} {
		if _, err := exec.LookPath(p); err != nil {
			return fmt.Errorf("%s is not installed: run make deps (as root) or apt-get install iperf3 util-linux", p)
		}
	}
	s := &scope{name: "bench"}
	defer s.close()
	u, err := benchUser(s)
	if err != nil {
		return fmt.Errorf("unprivileged user: %w", err)
	}
	b, err := copyBins(cfg.binDir)
	if err != nil {
		return fmt.Errorf("copy binaries for user %s: %w", u.Name, err)
	}
	defer os.RemoveAll(b.dir)
	bn := &bench{cfg: cfg, env: &env{user: u, bins: b}, results: newResults(cfg)}

	var active []contender
	for i, c := range contenders() {
		c.index = i
		if cfg.only != nil && !cfg.only[c.name] || cfg.only == nil && cfg.quick && !c.quick {
			continue
		}
		if reason := bn.unavailable(c); reason != "" {
			bn.results.skip(c.name, reason)
			fmt.Fprintf(os.Stderr, "skip %s: %s\n", c.name, reason)
			continue
		}
		active = append(active, c)
	}
	fmt.Fprintf(os.Stderr, "portkit-bench: %d contenders, %d run(s) each, as user %s, %d CPUs\n",
		len(active), cfg.runs, u.Name, runtime.NumCPU())
	for run := 0; run < cfg.runs; run++ {
		// Rotate the order each run so no contender always goes first.
		for k := range active {
			c := active[(k+run)%len(active)]
			t0 := time.Now()
			err := bn.once(c, run == cfg.runs-1)
			status := "ok"
			if err != nil {
				status = err.Error()
			}
			fmt.Fprintf(os.Stderr, "run %d/%d %-24s %5.1fs %s\n", run+1, cfg.runs, c.name, time.Since(t0).Seconds(), status)
		}
	}
	bn.results.took = time.Since(started)
	if err := bn.results.write(cfg.out, os.Stdout); err != nil {
		return err
	}
	// A contender that fails is a finding, printed in the table; direct
	// failing means the harness itself is broken.
	if _, ran := bn.results.values["direct"]; ran && !bn.results.ok("direct") {
		return fmt.Errorf("the direct baseline failed in every run, so the harness is broken: %v", bn.results.notes["direct"])
	}
	return nil
}

// unavailable says why c cannot run on this machine, or "".
func (bn *bench) unavailable(c contender) string {
	for _, p := range c.needs {
		if _, err := exec.LookPath(p); err != nil {
			return p + " is not installed"
		}
	}
	if c.portkit != nil {
		if ok, why := portkitHas(bn.env.bins.have["portkit"], c.portkit); !ok {
			return why
		}
	}
	if c.cni && (bn.env.bins.have["usernet"] == "" || bn.env.bins.have["portdriver"] == "") {
		return "bin/usernet and bin/portdriver are not built"
	}
	if c.peer && os.Geteuid() != 0 {
		return "clients from a non-loopback address need a veth peer netns, which needs root"
	}
	return ""
}

// once sets c up, measures everything once, and tears it down.
func (bn *bench) once(c contender, withMemory bool) (err error) {
	s := &scope{name: c.name}
	defer s.close()
	r := bn.results
	r.peer[c.name] = c.peer
	cl := client{ip: "127.0.0.1"}
	if c.peer {
		var p *testenv.Peer
		if err, _ := s.run(func() error { p = testenv.NewPeer(s); return nil }); err != nil {
			r.fail(c.name, "peer netns: "+err.Error())
			return err
		}
		cl = client{netns: p.Path, ip: p.LocalIP4.String()}
	}
	base := 21000 + 200*c.index
	direct := c.direct
	child := func(host, port int) int {
		if direct {
			return host
		}
		return port
	}
	iperfHost, tcpHost, udpHost := base, base+1, base+2
	ports := []mapping{
		{"tcp", cl.ip, iperfHost, child(iperfHost, iperfPort)},
		{"udp", cl.ip, iperfHost, child(iperfHost, iperfPort)},
		{"tcp", cl.ip, tcpHost, child(tcpHost, tcpRRPort)},
		{"udp", cl.ip, udpHost, child(udpHost, udpRRPort)},
	}
	var in *instance
	err, skipped := s.run(func() (err error) { in, err = c.start(bn.env, s, ports); return })
	if err != nil {
		if _, ok := err.(skipError); ok || skipped {
			r.skip(c.name, err.Error())
		} else {
			r.fail(c.name, "set up: "+err.Error())
		}
		return err
	}
	if direct {
		in.bindAddr = cl.ip
	}
	if in.setupMs > 0 {
		r.add(c.name, "setup_ms", in.setupMs)
	}
	if err := bn.startServers(s, in, ports); err != nil {
		r.fail(c.name, "servers: "+err.Error())
		return err
	}
	if failed, err := warmUp(cl, tcpHost); err != nil {
		r.fail(c.name, "no connection through the published port: "+err.Error())
		return err
	} else if failed > 0 {
		r.note(c.name, fmt.Sprintf("the first %d connection(s) through the new port failed (1 s timeout)", failed))
	}

	cfg := bn.cfg
	note := func(key string, err error) {
		if err != nil {
			r.note(c.name, key+": "+err.Error())
		}
	}
	for _, t := range []struct {
		key     string
		streams int
		reverse bool
	}{{"tcp_h2c_1", 1, false}, {"tcp_h2c_4", 4, false}, {"tcp_c2h_1", 1, true}, {"tcp_c2h_4", 4, true}} {
		args := []string{"-P", strconv.Itoa(t.streams)}
		if t.reverse {
			args = append(args, "-R")
		}
		bps, _, err := iperf(cl, iperfHost, cfg.tcpSecs, args...)
		note(t.key, err)
		if err == nil {
			r.add(c.name, t.key, bps/1e9)
		}
	}
	for _, n := range []int{1, 16} {
		rate, lat, err := shortConns(cl, tcpHost, n, cfg.connDur)
		key := fmt.Sprintf("conn_%d", n)
		note(key, err)
		if err == nil {
			r.add(c.name, key, rate)
			r.add(c.name, key+"_p50", lat.percentile(50))
			r.add(c.name, key+"_p99", lat.percentile(99))
		}
	}
	// Request/reply first: when no datagram passes, iperf3 -u would only hang.
	lat, lost, err := udpRR(cl, udpHost, cfg.rrDur)
	note("udp_rr", err)
	if err == nil {
		r.add(c.name, "udp_rr_p50", lat.percentile(50))
		r.add(c.name, "udp_rr_p99", lat.percentile(99))
		if lost > 0 {
			r.note(c.name, fmt.Sprintf("udp_rr: %d requests without a reply within 200 ms", lost))
		}
		for _, rate := range cfg.udpRates {
			bps, loss, err := iperf(cl, iperfHost, cfg.udpSecs, "-u", "-b", rate, "-l", "1400")
			key := "udp_" + rate
			note(key, err)
			if err == nil {
				r.add(c.name, key, bps/1e6)
				r.add(c.name, key+"_loss", loss)
			}
		}
	}
	if withMemory && len(in.roots) > 0 {
		bn.memory(c.name, in, cl, base, tcpHost)
	}
	return nil
}

// memory measures the forwarder's RSS idle, with cfg.totalPorts ports, and
// with cfg.idleConns idle connections open, and the per-port API time.
func (bn *bench) memory(name string, in *instance, cl client, base, tcpHost int) {
	r := bn.results
	settle := func() { time.Sleep(300 * time.Millisecond) }
	settle()
	idle, procs := treeRSS(in.roots, in.skipComm)
	r.add(name, "rss_idle", float64(idle)/1024)
	r.procs[name] = procs
	if in.add != nil {
		var took []float64
		var err error
		for i := 4; i < bn.cfg.totalPorts && err == nil; i++ {
			t0 := time.Now()
			err = in.add(mapping{"tcp", cl.ip, base + 10 + i, 9000 + i})
			took = append(took, float64(time.Since(t0).Microseconds())/1000)
		}
		if err != nil {
			r.note(name, "add ports: "+err.Error())
		} else {
			settle()
			kib, _ := treeRSS(in.roots, in.skipComm)
			r.add(name, "rss_ports", float64(kib)/1024)
			sort.Float64s(took)
			r.add(name, "add_api_ms", took[len(took)/2])
		}
	}
	before, _ := treeRSS(in.roots, in.skipComm)
	closeAll, err := openIdle(cl, tcpHost, bn.cfg.idleConns)
	if err != nil {
		r.note(name, "idle connections: "+err.Error())
		return
	}
	defer closeAll()
	settle()
	kib, _ := treeRSS(in.roots, in.skipComm)
	r.add(name, "rss_conns", float64(kib)/1024)
	r.add(name, "per_conn_kib", float64(kib-before)/float64(bn.cfg.idleConns))
}

// startServers starts iperf3 -s and the request/reply server where the
// contender's child side is, as the unprivileged user, and waits for them.
func (bn *bench) startServers(s *scope, in *instance, ports []mapping) error {
	u := bn.env.user
	cmd := func(name string, args ...string) *exec.Cmd {
		if in.childPID == 0 {
			return u.Cmd(name, args...)
		}
		return (&testenv.Netns{PID: in.childPID}).Command(u, name, args...)
	}
	iperfPort, tcpPort, udpPort := ports[0].child, ports[2].child, ports[3].child
	srv := cmd("iperf3", "-s", "-p", strconv.Itoa(iperfPort), "-B", in.bindAddr)
	srv.Stderr = os.Stderr
	if err := start(s, srv); err != nil {
		return err
	}
	rr := cmd(bn.env.bins.self)
	rr.Env = append(rr.Env, fmt.Sprintf("%s=tcp=%s,udp=%s", serveEnv,
		joinHostPort(in.bindAddr, tcpPort), joinHostPort(in.bindAddr, udpPort)))
	rr.Stderr = os.Stderr
	if err := start(s, rr); err != nil {
		return err
	}
	// Each server's own /proc/PID/net shows the netns it listens in.
	for _, w := range []struct {
		pid   int
		proto string
		port  int
	}{{srv.Process.Pid, "tcp", iperfPort}, {rr.Process.Pid, "tcp", tcpPort}, {rr.Process.Pid, "udp", udpPort}} {
		if err := waitListening(w.pid, w.proto, w.port, 10*time.Second); err != nil {
			return err
		}
	}
	return nil
}

func joinHostPort(host string, port int) string {
	if strings.Contains(host, ":") {
		return "[" + host + "]:" + strconv.Itoa(port)
	}
	return host + ":" + strconv.Itoa(port)
}

// warmUp waits until an exchange goes through the published port: some
// forwarders bind their listener a moment after they return. It reports how
// many attempts failed first, since a first connection that hangs is a finding.
func warmUp(cl client, port int) (failed int, err error) {
	errc := make(chan error, 1)
	go func() {
		leave, err := cl.enter()
		if err != nil {
			errc <- err
			return
		}
		defer leave()
		req, resp := make([]byte, msgSize), make([]byte, msgSize)
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := exchange(cl.addr(port), req, resp, time.Second)
			if err == nil || time.Now().After(deadline) {
				errc <- err
				return
			}
			failed++
			time.Sleep(20 * time.Millisecond)
		}
	}()
	err = <-errc
	return failed, err
}
