defmodule Ottla.Consumer.Revoker do
  @moduledoc false
  # Carries out revocations for the NIF, which sends it
  # `{:ottla_revoke, id, deadline, [{{topic, partition}, worker_pid}]}` from inside
  # librdkafka's rebalance callback. `deadline` is absolute, in Erlang's monotonic clock
  # (ms), set by the NIF: every revoked partition's worker gets a `:shutdown` exit (it
  # finishes its batch) and is killed at the deadline; then the user's
  # `assignments_revoked_handler` runs, killed if it is still running 100 ms past the
  # deadline; then the NIF is told (`consumer_revoke_done/2`), commits the revoked
  # partitions' acks and lets librdkafka go on. The NIF also sees each worker's death through
  # its own monitor and does not go on before.
  #
  # It is a process of its own, at high priority, that runs no user code itself, so that a
  # busy, slow or suspended manager cannot stretch a revocation past its deadline (which
  # would let two members handle one partition at once).
  require Logger

  @doc "Starts the revoker of a consumer, linked to the caller (its manager)."
  def start_link(revoked_handler) do
    pid = spawn_link(fn -> init(revoked_handler) end)
    {:ok, pid}
  end

  @doc "Hands the revoker the consumer's resource, once it exists."
  def serve(pid, resource), do: send(pid, {:ottla_resource, resource})

  defp init(revoked_handler) do
    Process.flag(:priority, :high)

    receive do
      {:ottla_resource, resource} -> loop(resource, revoked_handler)
    end
  end

  defp loop(resource, revoked_handler) do
    receive do
      {:ottla_revoke, id, deadline, workers} ->
        Logger.info("revoking #{inspect(Enum.map(workers, &elem(&1, 0)))}")
        stop_workers(Enum.map(workers, &elem(&1, 1)), deadline)
        run_bounded(revoked_handler, deadline + 100, "assignments_revoked_handler")
        Ottla.Native.consumer_revoke_done(resource, id)
        loop(resource, revoked_handler)

      _other ->
        loop(resource, revoked_handler)
    end
  end

  @doc """
  Stops processes together: each gets a `:shutdown` exit (a worker finishes its current
  batch) until `deadline` (Erlang monotonic ms), then is killed. Returns once all are dead.
  """
  def stop_workers(pids, deadline) do
    running =
      for pid <- pids do
        ref = Process.monitor(pid)
        Process.exit(pid, :shutdown)
        {pid, ref}
      end

    Enum.each(running, fn {pid, ref} ->
      left = max(deadline - System.monotonic_time(:millisecond), 0)

      receive do
        {:DOWN, ^ref, :process, ^pid, _} -> :ok
      after
        left ->
          Logger.warning("a worker did not finish its batch in time and was killed")
          Process.exit(pid, :kill)

          receive do
            {:DOWN, ^ref, :process, ^pid, _} -> :ok
          end
      end
    end)
  end

  @doc "Runs a user callback in a process of its own, killed if it runs past `deadline`."
  def run_bounded(fun, deadline, name) do
    {pid, ref} =
      spawn_monitor(fn ->
        try do
          fun.()
        catch
          kind, reason ->
            Logger.error("#{name} failed: " <> Exception.format(kind, reason, __STACKTRACE__))
        end
      end)

    left = max(deadline - System.monotonic_time(:millisecond), 0)

    receive do
      {:DOWN, ^ref, :process, ^pid, _} -> :ok
    after
      left ->
        Process.exit(pid, :kill)
        Logger.error("#{name} did not return within the drain timeout and was stopped")

        receive do
          {:DOWN, ^ref, :process, ^pid, _} -> :ok
        end
    end
  end
end
