// Waits until a Kafka cluster answers metadata requests with the expected number of brokers.
// Run with the broker's own classpath: java -cp "<jars>/*" KafkaReady.java BOOTSTRAP COUNT TIMEOUT_S
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;

public class KafkaReady {
  public static void main(String[] args) throws Exception {
    String bootstrap = args[0];
    int expected = Integer.parseInt(args[1]);
    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[2]));
    Properties props = new Properties();
    props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "2000");
    props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "3000");
    String last = "no answer";
    try (Admin admin = Admin.create(props)) {
      while (System.nanoTime() < deadline) {
        try {
          int seen = admin.describeCluster().nodes().get(3, TimeUnit.SECONDS).size();
          if (seen >= expected) {
            System.out.println("ready: " + seen + " broker(s) at " + bootstrap);
            return;
          }
          last = seen + " of " + expected + " brokers";
        } catch (Exception e) {
          last = e.toString();
        }
        Thread.sleep(250);
      }
    }
    System.err.println("not ready after " + args[2] + "s: " + last);
    System.exit(1);
  }
}
