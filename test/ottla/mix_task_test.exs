defmodule Ottla.MixTaskTest do
  # `mix ottla.kafka` from a fresh app that depends on Ottla by path: it starts a real broker
  # of its own (on ports no other test uses, its state outside the app), the app produces to
  # it and reads the message back, and the task stops it.
  use ExUnit.Case, async: true

  @moduletag timeout: 300_000

  # One app for the module's tests.
  setup_all do
    dir = Path.join(System.tmp_dir!(), "ottla-mix-task-#{System.unique_integer([:positive])}")
    app = Path.join(dir, "my_app")
    File.mkdir_p!(Path.join(app, "lib"))
    on_exit(fn -> File.rm_rf!(dir) end)

    File.write!(Path.join(app, "mix.exs"), """
    defmodule MyApp.MixProject do
      use Mix.Project

      def project,
        do: [app: :my_app, version: "0.1.0", deps: [{:ottla, path: #{inspect(File.cwd!())}}]]

      def application, do: [extra_applications: [:logger]]
    end
    """)

    port = 19_000 + :rand.uniform(800)

    env = [
      {"MIX_ENV", "dev"},
      {"OTTLA_KAFKA_PORT", Integer.to_string(port)},
      {"OTTLA_KAFKA_STATE", Path.join(dir, "kafka-state")}
    ]

    {:ok, app: app, port: port, env: env, state: Path.join(dir, "kafka-state")}
  end

  defp mix(ctx, args) do
    System.cmd("mix", args, cd: ctx.app, env: ctx.env, stderr_to_stdout: true)
  end

  test "starts a broker that the app produces to, reports it, and stops it", ctx do
    on_exit(fn -> mix(ctx, ["ottla.kafka", "stop"]) end)

    assert {out, 0} = mix(ctx, ["ottla.kafka", "start"])
    assert out =~ "ready at 127.0.0.1:#{ctx.port}"
    # Its state is where it was told, not in the app.
    assert File.dir?(ctx.state)
    refute File.exists?(Path.join(ctx.app, "kafka-state"))

    assert {out, 0} = mix(ctx, ["ottla.kafka", "status"])
    assert out =~ "broker 1: running"
    assert {out, 0} = mix(ctx, ["ottla.kafka", "endpoints"])
    assert out =~ ~r/^127\.0\.0\.1:#{ctx.port}$/m

    script = """
    endpoints = [{"127.0.0.1", #{ctx.port}}]
    :ok = Ottla.create_topic(endpoints, "from-my-app")
    :ok = Ottla.produce(endpoints, "from-my-app", {"k", "hello from my_app"})
    {:ok, _, [message]} = Ottla.fetch(endpoints, "from-my-app")
    IO.puts("fetched: " <> message.value)
    """

    assert {out, 0} = mix(ctx, ["run", "-e", script])
    assert out =~ "fetched: hello from my_app"

    assert {_, 0} = mix(ctx, ["ottla.kafka", "stop"])
    assert {out, status} = mix(ctx, ["ottla.kafka", "status"])
    assert status != 0
    assert out =~ "broker 1: stopped"
  end

  test "an unknown command prints the usage and fails", ctx do
    assert {out, status} = mix(ctx, ["ottla.kafka", "bogus"])
    assert status != 0
    assert out =~ "start --cluster"
  end
end
