// Command nodeprobe is the workload of the testbed node's tests, packaged as an image by the
// tests themselves (no registry, no base image): a static binary with two modes.
//
//	nodeprobe serve ADDR   answer every HTTP request with "hello from $HOSTNAME"
//	nodeprobe probe URL... print what a pod sees, one "key: value" line each, then wait:
//	                       its ServiceAccount token, an HTTP GET of each URL ("service-N":
//	                       another pod through a Service, by ClusterIP or by DNS name), and the
//	                       API server reached in-cluster with that token
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

const saDir = "/var/run/secrets/kubernetes.io/serviceaccount"

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: nodeprobe serve ADDR | nodeprobe probe URL")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2])
	case "probe":
		probe(os.Args[2:])
		wait()
	default:
		os.Exit(2)
	}
}

func serve(addr string) {
	host, _ := os.Hostname()
	http.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "hello from %s", host)
	})
	fmt.Println("serving on", addr)
	if err := http.ListenAndServe(addr, nil); err != nil {
		fmt.Println("serve:", err)
		os.Exit(1)
	}
}

func line(key, value string) {
	fmt.Printf("%s: %s\n", key, strings.ReplaceAll(value, "\n", " "))
}

func probe(urls []string) {
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if ipnet, ok := a.(*net.IPNet); ok && !ipnet.IP.IsLoopback() && ipnet.IP.To4() != nil {
			line("pod-ip", ipnet.IP.String())
		}
	}
	token, err := os.ReadFile(saDir + "/token")
	if err != nil {
		line("token", "error "+err.Error())
	} else {
		line("token", fmt.Sprintf("%d bytes", len(token)))
	}
	client := &http.Client{Timeout: 5 * time.Second}
	for i, url := range urls {
		var body []byte
		for attempt := 0; attempt < 30; attempt++ {
			resp, err := client.Get(url)
			if err == nil {
				body, _ = io.ReadAll(resp.Body)
				resp.Body.Close()
				break
			}
			body = []byte("error " + err.Error())
			time.Sleep(time.Second)
		}
		line(fmt.Sprintf("service-%d", i), string(body))
	}
	line("apiserver", apiserver(token))
}

// apiserver asks for /api the way an in-cluster client does (KUBERNETES_SERVICE_HOST/PORT, the
// mounted CA and token); only an authenticated user gets 200 there, an anonymous one 403.
func apiserver(token []byte) string {
	ca, err := os.ReadFile(saDir + "/ca.crt")
	if err != nil {
		return "error " + err.Error()
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	client := &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	host := net.JoinHostPort(os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT"))
	req, _ := http.NewRequest("GET", "https://"+host+"/api", nil)
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	resp, err := client.Do(req)
	if err != nil {
		return "error " + err.Error()
	}
	defer resp.Body.Close()
	return fmt.Sprintf("%d", resp.StatusCode)
}

func wait() {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	<-signals
}
