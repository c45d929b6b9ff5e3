// JVM workload for the JIT-frame tests: `work` calls `leafA` three times
// for each call of `leafB`; both leaves run the same loop, so their CPU
// time splits 3:1. Runs for the seconds given on the command line.
public class JitWork {
    static long leafA(long n) {
        long total = 0;
        for (long i = 0; i < n; i++) total += (i * i) % 7;
        return total;
    }

    static long leafB(long n) {
        long total = 0;
        for (long i = 0; i < n; i++) total += (i * i) % 7;
        return total;
    }

    // Called again and again, so that it is compiled and its compiled code
    // runs (a method that loops forever only ever runs on-stack replaced).
    static long work(int rounds) {
        long sink = 0;
        for (int r = 0; r < rounds; r++) {
            for (int k = 0; k < 3; k++) sink += leafA(2000);
            sink += leafB(2000);
        }
        return sink;
    }

    public static void main(String[] args) {
        long deadline = System.nanoTime() + (long) (Double.parseDouble(args[0]) * 1e9);
        long sink = 0;
        while (System.nanoTime() < deadline) sink += work(100);
        System.out.println(sink % 10);
    }
}
