defmodule Ottla.Group.Manager do
  @moduledoc false
  # Owns a connection's native consumer. Reacts to what the NIF reports: assignments (start
  # a worker per partition), revocations (stop them, call the user's handler, answer so the
  # rebalance proceeds) and worker deaths (rewind, restart with backoff).
  use GenServer
  require Logger

  alias Ottla.Native

  @max_backoff 30_000

  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  @doc "The native consumer of a connection, or nil."
  def resource(connection), do: :persistent_term.get({__MODULE__, connection}, nil)

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    connection = opts.connection

    with {:ok, assignment} <- assignment(opts),
         {:ok, resource} <-
           Native.consumer_new(
             opts.bootstrap,
             opts.props,
             self(),
             opts.topics,
             assignment,
             {opts.max_batch, opts.max_backlog, opts.drain_timeout, opts.commit_interval}
           ) do
      :persistent_term.put({__MODULE__, connection}, resource)
      {:ok, Map.merge(opts, %{resource: resource, partitions: %{}})}
    else
      {:error, error} -> {:stop, error}
    end
  end

  # Group mode subscribes; assign mode (Elsa's `consumer:`) lists its partitions.
  defp assignment(%{mode: :group}), do: {:ok, []}

  defp assignment(%{mode: :assign, topics: [topic]} = opts) do
    partitions =
      case opts.partition do
        :all ->
          with {:ok, topics} <-
                 Native.admin_list_topics(opts.bootstrap, opts.connection_config, 10_000) do
            case List.keyfind(topics, topic, 0) do
              {^topic, count} ->
                {:ok, Enum.to_list(0..(count - 1))}

              nil ->
                {:error,
                 Ottla.Error.new(
                   :unknown_topic_or_partition,
                   "topic #{inspect(topic)} does not exist"
                 )}
            end
          end

        p ->
          {:ok, [p]}
      end

    offset =
      case opts.begin_offset do
        :earliest -> -1
        :latest -> -2
        n -> n
      end

    with {:ok, list} <- partitions, do: {:ok, Enum.map(list, &{topic, &1, offset})}
  end

  @impl true
  def handle_info({:ottla_assigned, _id, generation, tps}, state) do
    Logger.info("assigned #{inspect(tps)} at generation #{inspect(generation)}",
      connection: state.connection
    )

    internal = internal_generation(state, generation)

    state =
      Enum.reduce(tps, state, fn {topic, partition} = tp, acc ->
        if acc.mode == :group do
          case call_assignment_handler(acc, topic, partition, generation) do
            :ok ->
              :ok

            other ->
              # As in Elsa: a failed assignment handler stops the consumer; its supervisor
              # restarts it, and it joins the group again.
              exit({:assignment_received_handler, topic, partition, other})
          end
        end

        entry = %{
          pid: nil,
          ref: nil,
          generation: internal,
          public: generation,
          failures: 0,
          acked: nil
        }

        start_worker(put_in(acc.partitions[tp], entry), tp)
      end)

    {:noreply, state}
  end

  def handle_info({:ottla_revoked, id, _generation, tps}, state) do
    Logger.info("revoking #{inspect(tps)}", connection: state.connection)

    {revoked, kept} = Map.split(state.partitions, tps)
    stop_workers(Map.values(revoked), state.drain_timeout)
    state = %{state | partitions: kept}

    try do
      state.assignments_revoked_handler.()
    catch
      kind, reason ->
        Logger.error(
          "assignments_revoked_handler failed: " <> Exception.format(kind, reason, __STACKTRACE__)
        )
    end

    Native.consumer_revoke_done(state.resource, id)
    {:noreply, state}
  end

  def handle_info({:DOWN, ref, :process, _pid, reason}, state) do
    case Enum.find(state.partitions, fn {_tp, e} -> e.ref == ref end) do
      nil ->
        {:noreply, state}

      {{topic, partition} = tp, entry}
      when reason == :shutdown or (is_tuple(reason) and elem(reason, 0) == :shutdown) ->
        # Stopped by the workers' supervisor, which is shutting down with the connection
        # (stops the manager makes itself are demonitored first): no restart.
        Native.consumer_worker_down(state.resource, topic, partition, entry.generation)
        {:noreply, put_in(state.partitions[tp], %{entry | pid: nil, ref: nil})}

      {{topic, partition} = tp, entry} ->
        {:ok, acked} =
          Native.consumer_worker_down(state.resource, topic, partition, entry.generation)

        failures = if acked != entry.acked, do: 0, else: entry.failures + 1
        delay = backoff(failures)

        Logger.warning(
          "worker for #{topic}/#{partition} stopped (#{inspect(reason, limit: 5)}); " <>
            "restarting in #{delay} ms from the offset after #{inspect(acked)}",
          topic: topic,
          partition: partition
        )

        Process.send_after(self(), {:restart, tp, entry.generation}, delay)
        entry = %{entry | pid: nil, ref: nil, failures: failures, acked: acked}
        {:noreply, put_in(state.partitions[tp], entry)}
    end
  end

  def handle_info({:restart, tp, generation}, state) do
    case state.partitions do
      %{^tp => %{generation: ^generation, pid: nil}} -> {:noreply, start_worker(state, tp)}
      _ -> {:noreply, state}
    end
  end

  def handle_info({:ottla_consumer_down, thread}, state) do
    Logger.error("the consumer's #{thread} thread failed; restarting the consumer")
    {:stop, {:consumer_down, thread}, state}
  end

  # The parent's exit stops the manager; a linked helper of a user callback ending normally
  # does not.
  def handle_info({:EXIT, _pid, :normal}, state), do: {:noreply, state}
  def handle_info({:EXIT, _pid, reason}, state), do: {:stop, reason, state}
  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    # Workers have been stopped by the supervisor (they come after us). Forget the resource
    # first, so late acks are dropped cleanly; then commit what was acked, leave the group
    # and free the client.
    :persistent_term.erase({__MODULE__, state.connection})
    Native.consumer_close(state.resource)
    :ok
  end

  defp internal_generation(%{mode: :group}, generation), do: generation
  defp internal_generation(_state, nil), do: 1

  defp backoff(0), do: 0
  defp backoff(failures), do: min(100 * Integer.pow(2, min(failures - 1, 20)), @max_backoff)

  defp call_assignment_handler(state, topic, partition, generation) do
    state.assignment_received_handler.(state.group, topic, partition, generation)
  catch
    kind, reason -> {:error, {kind, reason, __STACKTRACE__}}
  end

  defp start_worker(state, {topic, partition} = tp) do
    entry = state.partitions[tp]

    args = %{
      topic: topic,
      partition: partition,
      generation: entry.generation,
      public_generation: entry.public,
      connection: state.connection,
      resource: state.resource,
      handler: state.handler,
      handler_init_args: state.handler_init_args,
      shutdown: max(state.drain_timeout, 100)
    }

    result =
      if GenServer.whereis(state.worker_sup) do
        try do
          DynamicSupervisor.start_child(state.worker_sup, {Ottla.Consumer.Worker, args})
        catch
          :exit, reason -> {:error, {:exit, reason}}
        end
      else
        # The workers' supervisor starts right after the manager: try again in a moment.
        :not_ready
      end

    case result do
      :not_ready ->
        Process.send_after(self(), {:restart, tp, entry.generation}, 20)
        state

      {:ok, pid} ->
        put_in(state.partitions[tp], %{entry | pid: pid, ref: Process.monitor(pid)})

      :ignore ->
        state

      {:error, reason} ->
        failures = entry.failures + 1

        Logger.error(
          "could not start the worker for #{topic}/#{partition}: #{inspect(reason, limit: 5)}"
        )

        Process.send_after(self(), {:restart, tp, entry.generation}, backoff(failures))
        put_in(state.partitions[tp], %{entry | failures: failures})
    end
  end

  # Stops the workers of revoked partitions together. Their in-flight batches already had
  # the drain timeout to be acked, so each gets a short grace to finish, then is killed: a
  # revoked partition's handler must not run on once the rebalance goes on.
  @stop_grace 2_000
  defp stop_workers(entries, drain_timeout) do
    running =
      for %{pid: pid, ref: ref} <- entries, is_pid(pid) do
        Process.demonitor(ref, [:flush])
        ref = Process.monitor(pid)
        Process.exit(pid, :shutdown)
        {pid, ref}
      end

    deadline = System.monotonic_time(:millisecond) + min(drain_timeout, @stop_grace)

    Enum.each(running, fn {pid, ref} ->
      left = max(deadline - System.monotonic_time(:millisecond), 0)

      receive do
        {:DOWN, ^ref, :process, ^pid, _} -> :ok
      after
        left ->
          Process.exit(pid, :kill)

          receive do
            {:DOWN, ^ref, :process, ^pid, _} -> :ok
          end
      end
    end)
  end
end
